"""Baseline: k-means (C clusters) on the frozen backbone's patch features, scored like test_{mlp,tr}.py."""
from stages.baseline import kmeans_baseline
from stages.common import cli

if __name__ == "__main__":
    cli("test_kmeans", None, kmeans_baseline)
