"""Unsupervised segmentation metrics: a cluster x class histogram, Hungarian matching, mIoU and accuracy.

Conventions (the same as the published CAUSE / STEGO evaluation when there are no extra clusters):
- The histogram counts, over the whole split, pixels whose label is in ``[0, C)``; other labels
  (``-1`` and anything ``>= C``) are ignored.
- The Hungarian matching (``scipy.optimize.linear_sum_assignment``, maximise) runs once over the
  whole accumulated histogram; the linear probe uses ``matching=False`` (cluster i is class i).
- IoU of a class = TP / (label pixels + pixels predicted as it - TP). A class absent from both the
  labels and the matched prediction gets NaN and is left out of the mean (``nanmean``), as in the
  published code; a class absent from the labels but predicted gets IoU 0 and counts.
- With ``extra_clusters > 0`` the clusters left unmatched map to no class (-1): their pixels
  count as misses for their true class and in the accuracy denominator, and mIoU is taken
  over the ``C`` real classes only (STEGO instead adds an "other" class with IoU 0 to the mean).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment

from utils.errors import UserError


class UnsupervisedMetrics:
    """Accumulates predictions over a split, then matches clusters to classes and scores them."""

    def __init__(self, n_classes: int, extra_clusters: int = 0, matching: bool = True) -> None:
        if n_classes < 1 or extra_clusters < 0:
            raise UserError(f"UnsupervisedMetrics: expected n_classes >= 1 and extra_clusters >= 0, "
                            f"got {n_classes} and {extra_clusters}")
        if not matching and extra_clusters:
            raise UserError("UnsupervisedMetrics: matching=False (linear probe) needs extra_clusters=0")
        self.n_classes = n_classes
        self.n_clusters = n_classes + extra_clusters
        self.matching = matching
        self._assignment: np.ndarray | None = None   # (n_clusters,) class of each cluster, -1 = none
        self.reset()

    def reset(self) -> None:
        self._local = torch.zeros(self.n_clusters, self.n_classes, dtype=torch.int64)
        self._synced: torch.Tensor | None = None
        self._assignment = None

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add a batch: `pred` (B,H,W) cluster ids in [0, n_clusters), `label` (B,H,W) class ids."""
        if pred.shape != label.shape:
            raise UserError(f"UnsupervisedMetrics.update: prediction shape {tuple(pred.shape)} "
                            f"differs from label shape {tuple(label.shape)}")
        if pred.is_floating_point() or label.is_floating_point():
            raise UserError("UnsupervisedMetrics.update: expected integer predictions and labels, "
                            f"got {pred.dtype} and {label.dtype}")
        pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.n_clusters):
            raise UserError(f"UnsupervisedMetrics.update: predictions must lie in [0, {self.n_clusters}), "
                            f"got values in [{int(pred.min())}, {int(pred.max())}]")
        keep = (label >= 0) & (label < self.n_classes)
        flat = pred[keep] * self.n_classes + label[keep]                 # row-major (cluster, class)
        counts = torch.bincount(flat, minlength=self.n_clusters * self.n_classes)
        if self._local.device != counts.device:
            self._local = self._local.to(counts.device)
        self._local += counts.view(self.n_clusters, self.n_classes)
        self._synced = None

    def sync(self) -> None:
        """Sum the histograms of all ranks (no-op without torch.distributed); safe to call twice."""
        total = self._local.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        self._synced = total

    @property
    def histogram(self) -> torch.Tensor:
        """(n_clusters, n_classes) int64 counts: the synced one after `sync()`, else this rank's."""
        return self._synced if self._synced is not None else self._local

    def compute(self) -> dict[str, Any]:
        """Match clusters to classes and score.

        Returns "mIoU" and "Acc" (percent), "IoU" (per class, percent, NaN when undefined),
        "assignment" (class of each cluster, -1 = unmatched), "histogram" (n_clusters, C) and
        "confusion" (C, C): rows are true classes, columns matched predictions.
        """
        hist = self.histogram.cpu().numpy()                               # (K, C)
        if hist.sum() == 0:
            raise UserError("UnsupervisedMetrics.compute: no labelled pixels were seen; "
                            f"expected labels in [0, {self.n_classes})")
        assignment = np.full(self.n_clusters, -1, dtype=np.int64)
        if self.matching:
            clusters, classes = linear_sum_assignment(hist, maximize=True)
            assignment[clusters] = classes
        else:
            assignment[:] = np.arange(self.n_classes)
        self._assignment = assignment

        matched = assignment >= 0
        confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)   # (true, predicted)
        confusion[:, assignment[matched]] = hist[matched].T
        tp = np.diag(confusion).astype(np.float64)
        union = hist.sum(0) + confusion.sum(0) - tp           # label pixels + predicted pixels - TP
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = tp / union
        return {
            "mIoU": float(np.nanmean(iou) * 100),   # some class has label pixels, so not all NaN
            "Acc": float(tp.sum() / hist.sum() * 100),
            "IoU": [float(v * 100) for v in iou],
            "assignment": assignment.tolist(),
            "histogram": hist,
            "confusion": confusion,
        }

    def map_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        """Cluster ids -> matched class ids (-1 for unmatched clusters), by the last `compute()`."""
        if self._assignment is None:
            raise RuntimeError("UnsupervisedMetrics.map_prediction called before compute()")
        table = torch.from_numpy(self._assignment).to(pred.device)
        return table[pred.long()]
