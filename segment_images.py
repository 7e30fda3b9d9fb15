"""Segment your own images with trained CAUSE artifacts: colour maps, overlays and cluster ids at each image's size."""
from stages.inference import main

if __name__ == "__main__":
    main()
