"""Per-epoch validation of stages 2 and 3 (--validate, --val_images), as the published scripts do it.

The published front-door scripts score the linear probe on the val split after every epoch (there
is no trained cluster probe yet); the fine-tuning scripts also score the cluster probe (argmax of
the cosine to its rows, Hungarian-matched, no CRF). Here both are whole-split scores from the test
code's predictions and metrics: pixel accuracy and mIoU over the accumulated histogram (the
published print averages per-batch accuracies). Ranks of a data-parallel run score their shards
and sum the histograms; under --published_recipe each replica scores the split on its own.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from loader.sampler import make_loader
from modules.segment import SegmentMLP, SegmentTR
from stages.common import Run
from stages.predict import linear_prediction, predict
from stages.trained import segment_features
from utils.metrics import UnsupervisedMetrics


def make_validation(run: Run, segment: SegmentMLP | SegmentTR,
                    probe: torch.Tensor | None = None) -> Callable[[], dict[str, float]] | None:
    """The validation of a stage training `segment` (and the cluster `probe` (C, r), stage 3), or None
    when --validate is false or the val split has no labels."""
    args = run.args
    if not args.validate:
        return None
    # a TR head runs at the grid of its learned queries, so it is validated at its training resolution
    resolution = run.derived.train_resolution if run.structure == "TR" else run.derived.test_resolution
    dataset = run.dataset("val", resolution)
    if not dataset.has_labels:
        run.log(f"{args.data_dir} has no val labels: per-epoch validation skipped")
        return None
    run.note_same_folder_val()
    if args.val_images is not None:
        dataset = Subset(dataset, range(min(args.val_images, len(dataset))))
    shard = dict(rank=0, world_size=1) if run.recipe else dict(rank=run.dist.rank, world_size=run.dist.world_size)
    features = segment_features(run, segment)
    n_classes = run.derived.n_classes

    @torch.no_grad()
    def validate() -> dict[str, float]:
        metrics = {"linear": UnsupervisedMetrics(n_classes, matching=False)}
        if probe is not None:
            metrics["cluster"] = UnsupervisedMetrics(n_classes)
        loader = make_loader(dataset, args.batch_size, args.num_workers, run.device, shuffle=False, pad=False,
                             **shard)
        segment.eval()
        try:
            for batch in tqdm(loader, desc="[validation]", disable=not run.dist.is_main, leave=False):
                img, label = batch["img"], batch["label"].to(run.device)  # (B, 3, H, W), (B, H, W)
                size = tuple(label.shape[-2:])
                with run.amp.autocast():
                    if probe is None:
                        metrics["linear"].update(linear_prediction(features(img), segment.linear, size), label)
                    else:
                        pred = predict(features, probe, img, size, crf=False, linear=segment.linear)
                        metrics["linear"].update(pred.linear, label)
                        metrics["cluster"].update(pred.cluster, label)
        finally:
            segment.train()
        scores: dict[str, float] = {}
        for name, m in metrics.items():
            if not run.recipe:
                m.sync()
            s = m.compute()
            scores.update({f"{name}_acc": s["Acc"], f"{name}_mIoU": s["mIoU"]})
        return scores

    return validate
