"""Building the segment model of a run and the parameter groups the stages train."""
from __future__ import annotations

import torch

from modules.segment import SegmentMLP, SegmentTR
from stages.common import Run

TEACHER_PREFIXES = ("head_ema.", "projection_head_ema.")


def build_segment(run: Run) -> SegmentMLP | SegmentTR:
    a, d = run.args, run.derived
    if run.structure == "MLP":
        segment = SegmentMLP(d.embed_dim, a.reduced_dim, a.projection_dim, d.n_classes)
    else:
        num_queries = (d.train_resolution // d.patch_size) ** 2
        segment = SegmentTR(d.embed_dim, num_queries, a.reduced_dim, a.projection_dim, d.n_classes)
    for name, p in segment.named_parameters():
        if name.startswith(TEACHER_PREFIXES):
            p.requires_grad_(False)  # EMA teachers are never trained by gradients
    return segment


def student_parameters(segment: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Everything but the EMA teachers: student head, projection head, linear probe."""
    return [p for n, p in segment.named_parameters() if not n.startswith(TEACHER_PREFIXES)]


def clip_norm(run: Run, fine_tuning: bool = False) -> float | None:
    """Grad-norm clip of stages 2 and 3; None (no clipping) in the published recipe's stage 3 on the
    datasets the published fine-tuning has no value for (Pascal VOC, COCO-81, COCO-171)."""
    s = run.derived.settings
    if fine_tuning and run.recipe and not s.published_stage3_clip:
        return None
    return s.clip_mlp if run.structure == "MLP" else s.clip_tr
