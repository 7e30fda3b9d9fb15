"""Baseline: k-means (C clusters) on the frozen backbone's patch features, scored like test_{mlp,tr}.py."""
from stages.cli import cli  # torch-free: the stage body is imported after the flags are parsed

if __name__ == "__main__":
    cli("test_kmeans", None, "stages.baseline:kmeans_baseline")
