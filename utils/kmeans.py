"""K-means baseline on frozen features (faiss), the clustering STEGO-style baselines report.

Cosine k-means: features are L2-normalised and faiss runs spherical k-means (centroids are
re-normalised after each step); a feature goes to the centroid of highest cosine similarity.
Centroids start from k-means++ seeding (faiss alone seeds uniformly at random, which often
leaves two centroids in one cluster and none in another).
"""
from __future__ import annotations

import faiss
import numpy as np
import torch

from utils.errors import UserError

SEEDING_POINTS = 100_000    # k-means++ seeds are drawn from at most this many random features


def _as_unit_rows(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """(M, D) float32 C-contiguous with unit-norm rows (zero rows stay zero)."""
    x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if x.ndim != 2:
        raise UserError(f"k-means: expected features (M, D), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


def _kmeans_plus_plus(x: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """(n_clusters, D) seeds: each next one drawn with probability proportional to its squared
    distance to the nearest seed so far (on unit rows, 2 - 2 cos)."""
    seeds = [x[rng.integers(len(x))]]
    nearest = np.full(len(x), np.inf, dtype=np.float64)
    for _ in range(1, n_clusters):
        nearest = np.minimum(nearest, np.maximum(2.0 - 2.0 * (x @ seeds[-1]), 0.0))
        total = nearest.sum()
        pick = rng.choice(len(x), p=nearest / total) if total > 0 else rng.integers(len(x))
        seeds.append(x[pick])
    return np.stack(seeds).astype(np.float32)


def kmeans_fit(features: np.ndarray | torch.Tensor, n_clusters: int, seed: int = 0,
               niter: int = 100) -> np.ndarray:
    """Centroids (n_clusters, D) float32, unit norm, of spherical k-means on `features` (M, D)."""
    x = _as_unit_rows(features)
    if not 1 <= n_clusters <= len(x):
        raise UserError(f"k-means: expected 1 <= n_clusters <= {len(x)} features, got {n_clusters}")
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(len(x), size=min(len(x), SEEDING_POINTS), replace=False)]
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, spherical=True, verbose=False)
    kmeans.train(x, init_centroids=_kmeans_plus_plus(sample, n_clusters, rng))
    return kmeans.centroids.copy()


def kmeans_assign(features: np.ndarray | torch.Tensor, centroids: np.ndarray) -> np.ndarray:
    """Cluster id (M,) int64 of each feature: the centroid of highest cosine similarity."""
    x = _as_unit_rows(features)
    c = _as_unit_rows(centroids)
    if x.shape[1] != c.shape[1]:
        raise UserError(f"k-means: features have {x.shape[1]} dims, centroids {c.shape[1]}")
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    _, nearest = index.search(x, 1)                                      # (M, 1)
    return nearest[:, 0].astype(np.int64)
