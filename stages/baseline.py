"""The k-means baseline (test_kmeans.py): CAUSE's test protocol on the frozen backbone alone.

Fitting: spherical k-means (faiss, k-means++ seeds) with C clusters, C = the dataset's class
count, on patch features of the **val** split at the test resolution (the split being scored;
no label is read). At most about --kmeans_samples features are used (200k: 0.6 GB for a
768-wide backbone): the same number drawn at random from every image, seeded by the image
index, so the sample does not depend on batching. Rank 0 fits and sends the centroids to the
other ranks.
Scoring: exactly the evaluation of test_{mlp,tr}.py with the backbone feature map in place of
the segment head and the centroids in place of the cluster probe: bilinear upsampling of the
features to the label size, cosine to the centroids, argmax; the CRF pass averages the
flipped image's features and refines log_softmax(3 x cos); Hungarian matching over the whole
split. There is no linear probe. Report: results/<dataset>/KMEANS/<ckpt name>/<C>/.
Cache: a metrics.json there made with the same settings (data folder and fingerprint of the val
split, flags) from the same backbone file (sha256) is reused; one made otherwise stops the run;
--overwrite recomputes.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from loader.sampler import make_loader
from stages.artifacts import record_differences
from stages.common import Run, tokens_to_map
from stages.evaluate import SCORES, Method, evaluate_split, kmeans_results_dir, read_metrics
from stages.predict import FeatureFn
from utils.distributed import is_enabled
from utils.errors import UserError
from utils.io import file_record
from utils.kmeans import kmeans_fit


def kmeans_baseline(run: Run) -> None:
    """test_kmeans.py: fit k-means on the val features, then evaluate it like a trained model."""
    if run.args.kmeans_samples < run.derived.n_classes:
        raise UserError(f"--kmeans_samples {run.args.kmeans_samples}: expected at least the "
                        f"{run.derived.n_classes} clusters to fit")
    shared = {k: v for k, v in run.shared_settings().items() if k != "num_codebook"}  # K plays no part
    record = {
        "settings": {**shared, "method": "k-means on frozen backbone patch features",
                     "n_clusters": run.derived.n_classes, "fit_split": "val", "seed": run.args.seed,
                     "kmeans_samples": run.args.kmeans_samples, "test_resolution": run.derived.test_resolution,
                     "save_images": run.args.save_images},
        "upstream": {"backbone": file_record(run.backbone_file)},
        "checkpoints": {"backbone": str(run.args.ckpt)},
    }
    out = kmeans_results_dir(run)
    if reuse_result(run, out / "metrics.json", record):
        return
    centroids = fit_centroids(run)
    evaluate_split(run, Method("k-means", backbone_features(run), centroids, None, out, record))


def reuse_result(run: Run, path: Path, record: dict) -> bool:
    """True (and its scores logged) when `path`, an earlier report, was made as `record` describes this run;
    an earlier report made otherwise stops the run unless --overwrite. False when there is none."""
    earlier = None if run.args.overwrite else read_metrics(path)
    if earlier is None:
        return False
    diffs = record_differences(earlier, record["settings"], record["upstream"])
    if diffs:
        raise UserError(f"{path} already exists and was made otherwise ({'; '.join(diffs)}); "
                        f"pass --overwrite to recompute it, or use another --results_dir")
    run.log(f"{path} already holds the k-means baseline of these settings and this backbone file; nothing to do "
            f"(pass --overwrite to recompute)")
    for name in SCORES[:2]:
        run.log(f"[k-means] {name:>16}: mIoU {earlier[name]['mIoU']:.2f}  Acc {earlier[name]['Acc']:.2f}")
    return True


def backbone_features(run: Run) -> FeatureFn:
    """Frozen backbone patch features as a map (B, D, h, w)."""
    def features(img: torch.Tensor) -> torch.Tensor:
        return tokens_to_map(run.features(img), img, run.derived.patch_size)
    return features


def fit_centroids(run: Run) -> torch.Tensor:
    """(C, D) unit-norm centroids on the run's device, identical on every rank."""
    shape = (run.derived.n_classes, run.derived.embed_dim)
    if run.dist.is_main:
        sample = sample_features(run)
        run.log(f"k-means: fitting {shape[0]} clusters on {len(sample)} patch features of the val split")
        centroids = torch.from_numpy(kmeans_fit(sample, shape[0], seed=run.args.seed)).to(run.device)
    else:
        centroids = torch.empty(shape, device=run.device)
    if is_enabled():
        dist.broadcast(centroids, src=0)
    return centroids


@torch.no_grad()
def sample_features(run: Run) -> np.ndarray:
    """(M, D) float32 patch features of the val split, the same random number from each image."""
    args = run.args
    dataset = run.dataset("val", run.derived.test_resolution)
    tokens = (run.derived.test_resolution // run.derived.patch_size) ** 2
    per_image = min(tokens, math.ceil(args.kmeans_samples / len(dataset)))
    loader = make_loader(dataset, args.batch_size, args.num_workers, run.device, shuffle=False, pad=False)
    chunks = []
    for batch in tqdm(loader, desc=f"[k-means] sampling {per_image} features per image"):
        feat = run.features(batch["img"])  # (B, N, D)
        for k, ind in enumerate(batch["ind"].tolist()):
            pick = torch.randperm(tokens, generator=torch.Generator().manual_seed(args.seed * 1_000_003 + ind))
            chunks.append(feat[k, pick[:per_image].to(feat.device)].cpu().numpy())
    return np.concatenate(chunks)
