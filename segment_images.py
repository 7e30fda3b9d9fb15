"""Segment your own images with trained CAUSE artifacts: colour maps, overlays and cluster ids at each image's size."""
from stages.cli import cli, structure_flag  # torch-free: the stage body is imported after the flags are parsed

if __name__ == "__main__":
    cli("segment_images", structure_flag, "stages.inference:segment_images")
