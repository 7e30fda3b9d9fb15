"""UnsupervisedMetrics against hand-computed scores and a brute-force matching; k-means baseline."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.errors import UserError
from utils.kmeans import kmeans_assign, kmeans_fit
from utils.metrics import UnsupervisedMetrics


def scores(n_classes: int, pred: list[int], label: list[int], **kwargs) -> tuple[UnsupervisedMetrics, dict]:
    metrics = UnsupervisedMetrics(n_classes, **kwargs)
    metrics.update(torch.tensor(pred).view(1, 1, -1), torch.tensor(label).view(1, 1, -1))
    return metrics, metrics.compute()


def test_hand_computed_confusion() -> None:
    # cluster x class counts: c0 = [1, 2, 0], c1 = [0, 1, 2], c2 = [3, 0, 0]; the -1 pixel is ignored.
    # Best matching c2->0, c0->1, c1->2 (7 pixels).
    metrics, out = scores(3, pred=[2, 2, 2, 0, 0, 0, 1, 1, 1, 0], label=[0, 0, 0, 0, 1, 1, 1, 2, 2, -1])
    assert out["assignment"] == [1, 2, 0]
    np.testing.assert_array_equal(out["histogram"], [[1, 2, 0], [0, 1, 2], [3, 0, 0]])
    np.testing.assert_array_equal(out["confusion"], [[3, 1, 0], [0, 2, 1], [0, 0, 2]])
    # IoU = TP / (label pixels + predicted pixels - TP)
    expected_iou = [3 / (4 + 3 - 3), 2 / (3 + 3 - 2), 2 / (2 + 3 - 2)]
    assert out["IoU"] == pytest.approx([100 * v for v in expected_iou])
    assert out["mIoU"] == pytest.approx(100 * sum(expected_iou) / 3)
    assert out["Acc"] == pytest.approx(100 * 7 / 9)
    mapped = metrics.map_prediction(torch.tensor([[0, 1], [2, 2]]))
    assert mapped.tolist() == [[1, 2], [0, 0]]


def test_permuted_perfect_prediction_over_batches_is_100() -> None:
    gen = torch.Generator().manual_seed(0)
    perm = torch.tensor([3, 0, 4, 1, 2])
    metrics = UnsupervisedMetrics(5)
    for _ in range(3):
        label = torch.randint(0, 5, (2, 8, 8), generator=gen)
        metrics.update(perm[label], label)
    out = metrics.compute()
    assert out["mIoU"] == pytest.approx(100.0)
    assert out["Acc"] == pytest.approx(100.0)
    assert [out["assignment"][int(p)] for p in perm] == [0, 1, 2, 3, 4]


def test_class_absent_from_split_is_nan_and_left_out_of_the_mean() -> None:
    _, out = scores(4, pred=[1, 1, 2, 0, 0], label=[0, 0, 1, 2, 2])
    assert math.isnan(out["IoU"][3])
    assert out["mIoU"] == pytest.approx(100.0)


def test_class_absent_from_labels_but_predicted_counts_as_zero() -> None:
    # c0 -> 0, c1 -> 1 and the stray cluster c2 -> absent class 2 (1 predicted pixel, IoU 0).
    _, out = scores(3, pred=[0, 0, 1, 1, 1, 2], label=[0, 0, 1, 1, 1, 1])
    assert out["IoU"] == pytest.approx([100.0, 75.0, 0.0])
    assert out["mIoU"] == pytest.approx(175 / 3)
    assert out["Acc"] == pytest.approx(100 * 5 / 6)


def test_ignored_labels_change_nothing() -> None:
    pred, label = [0, 1, 1, 0, 1], [0, 1, 0, 0, 1]
    _, clean = scores(2, pred, label)
    _, noisy = scores(2, pred + [0, 1, 1], label + [-1, 2, 255])
    np.testing.assert_array_equal(clean["histogram"], noisy["histogram"])
    assert clean["mIoU"] == noisy["mIoU"] and clean["Acc"] == noisy["Acc"]


def test_linear_probe_uses_identity_not_matching() -> None:
    pred, label = [1, 1, 0, 0], [0, 0, 1, 1]
    _, matched = scores(2, pred, label)
    _, linear = scores(2, pred, label, matching=False)
    assert matched["mIoU"] == pytest.approx(100.0)
    assert linear["mIoU"] == pytest.approx(0.0) and linear["Acc"] == pytest.approx(0.0)
    assert linear["assignment"] == [0, 1]


def test_extra_clusters_unmatched_map_to_minus_one_and_count_as_misses() -> None:
    metrics, out = scores(2, pred=[0, 0, 2, 1, 1, 1], label=[0, 0, 0, 1, 1, 1], extra_clusters=1)
    assert out["assignment"] == [0, 1, -1]
    assert out["IoU"] == pytest.approx([100 * 2 / 3, 100.0])
    assert out["Acc"] == pytest.approx(100 * 5 / 6)
    assert metrics.map_prediction(torch.tensor([2, 0, 1])).tolist() == [-1, 0, 1]


def test_matching_agrees_with_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    label = torch.randint(0, 4, (3, 16, 16), generator=gen)
    noise = torch.randint(0, 4, label.shape, generator=gen)
    pred = torch.where(torch.rand(label.shape, generator=gen) < 0.6, (label + 1) % 4, noise)
    metrics = UnsupervisedMetrics(4)
    metrics.update(pred, label)
    out = metrics.compute()

    hist = np.zeros((4, 4), dtype=np.int64)                  # (cluster, class), counted by hand
    for p, t in zip(pred.flatten().tolist(), label.flatten().tolist()):
        hist[p, t] += 1
    best = max(itertools.permutations(range(4)), key=lambda perm: sum(hist[k, perm[k]] for k in range(4)))
    assert out["assignment"] == list(best)
    tp = np.array([hist[best.index(c), c] for c in range(4)])
    iou = tp / (hist.sum(0) + hist[[best.index(c) for c in range(4)]].sum(1) - tp)
    assert out["mIoU"] == pytest.approx(100 * iou.mean())
    assert out["Acc"] == pytest.approx(100 * tp.sum() / hist.sum())


def test_reset_and_sync_without_distributed() -> None:
    metrics, first = scores(2, [0, 1, 1], [0, 1, 0])
    metrics.sync()
    metrics.sync()                                           # idempotent: no double counting
    np.testing.assert_array_equal(metrics.compute()["histogram"], first["histogram"])
    metrics.reset()
    assert int(metrics.histogram.sum()) == 0
    with pytest.raises(UserError, match="no labelled pixels"):
        metrics.compute()


@pytest.mark.parametrize("pred, label, match", [
    (torch.tensor([0, 3]), torch.tensor([0, 1]), r"predictions must lie in \[0, 3\)"),
    (torch.tensor([0, -1]), torch.tensor([0, 1]), "predictions must lie"),
    (torch.tensor([0, 1, 1]), torch.tensor([0, 1]), "shape"),
    (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "integer"),
])
def test_bad_input_is_a_user_error(pred: torch.Tensor, label: torch.Tensor, match: str) -> None:
    with pytest.raises(UserError, match=match):
        UnsupervisedMetrics(3).update(pred, label)


def test_map_before_compute_and_bad_settings() -> None:
    with pytest.raises(RuntimeError, match="before compute"):
        UnsupervisedMetrics(3).map_prediction(torch.tensor([0]))
    with pytest.raises(UserError, match="extra_clusters=0"):
        UnsupervisedMetrics(3, extra_clusters=2, matching=False)


def _sync_worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        metrics = UnsupervisedMetrics(3)
        label = torch.tensor([[0, 1, 2, 2]]) if rank == 0 else torch.tensor([[1, 1, 0, -1]])
        metrics.update((label.clamp(min=0) + 1) % 3, label)
        metrics.sync()
        torch.save(metrics.compute()["histogram"], Path(out_dir) / f"hist{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_sums_histograms_across_two_gloo_processes(tmp_path: Path) -> None:
    mp.spawn(_sync_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    label = torch.tensor([0, 1, 2, 2, 1, 1, 0, -1])
    _, single = scores(3, ((label.clamp(min=0) + 1) % 3).tolist(), label.tolist())
    for rank in range(2):
        np.testing.assert_array_equal(torch.load(tmp_path / f"hist{rank}.pt", weights_only=False),
                                      single["histogram"])


def blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four tight clusters around orthogonal directions in 16-D: (800, 16) features, (800,) ids."""
    rng = np.random.default_rng(seed)
    centers = np.eye(16, dtype=np.float32)[:4] * 5.0
    ids = np.repeat(np.arange(4), 200)
    return centers[ids] + rng.normal(0, 0.3, (800, 16)).astype(np.float32), ids


def test_kmeans_recovers_separated_blobs() -> None:
    features, ids = blobs(0)
    centroids = kmeans_fit(torch.from_numpy(features), 4, seed=0)
    assert centroids.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    clusters = kmeans_assign(features, centroids)
    metrics = UnsupervisedMetrics(4)
    metrics.update(torch.from_numpy(clusters).view(1, -1), torch.from_numpy(ids).view(1, -1))
    assert metrics.compute()["mIoU"] == pytest.approx(100.0)


def test_kmeans_is_deterministic_under_a_seed() -> None:
    features, _ = blobs(1)
    np.testing.assert_array_equal(kmeans_fit(features, 4, seed=3), kmeans_fit(features, 4, seed=3))
    with pytest.raises(UserError, match="n_clusters"):
        kmeans_fit(features, 0)
