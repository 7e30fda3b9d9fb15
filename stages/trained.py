"""Loading a trained CAUSE model (ours or the published files) and computing its segment features."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from modules.segment import Cluster, SegmentMLP, SegmentTR
from stages.artifacts import load_state_dict_checked
from stages.common import Run, tokens_to_map
from stages.segments import build_segment
from utils.errors import UserError


def load_trained(run: Run) -> tuple[SegmentMLP | SegmentTR, Cluster]:
    """Segment head + cluster probe from this run's artifact paths, in eval mode on the run's device."""
    settings = {**run.shared_settings(), **run.head_settings()}
    tag = run.structure.lower()
    segment = build_segment(run)
    load_state_dict_checked(segment, run.paths.segment, "segment head", f"train_front_door_{tag}.py", settings)
    cluster = Cluster(run.derived.embed_dim, run.args.reduced_dim, run.args.num_codebook, run.derived.n_classes)
    load_state_dict_checked(cluster, run.paths.cluster, "cluster probe", f"fine_tuning_{tag}.py", settings)
    segment.set_codebook(cluster.codebook.detach())
    return segment.to(run.device).eval(), cluster.to(run.device).eval()


def check_grid(run: Run, segment: torch.nn.Module, resolution: int) -> None:
    """A TR head has one learned query per patch of its training grid: it runs at that grid only."""
    if run.structure != "TR":
        return
    queries = segment.head.query_pos.shape[0]
    grid = (resolution // run.derived.patch_size) ** 2
    if queries != grid:
        side = int(round(queries ** 0.5)) * run.derived.patch_size
        raise UserError(f"the TR head was trained at resolution {side} ({queries} queries) but is run at "
                        f"{resolution}; pass --test_resolution {side} --train_resolution {side}")


@torch.no_grad()
def segment_features(run: Run, segment: torch.nn.Module, img: torch.Tensor, flip_average: bool) -> torch.Tensor:
    """Teacher segment features (B, r, h, w); with flip_average, averaged with the mirrored image's."""
    feat = tokens_to_map(segment.head_ema(run.features(img)))  # (B, r, h, w)
    if flip_average:
        flipped = tokens_to_map(segment.head_ema(run.features(img.flip(dims=[3]))))
        feat = (feat + flipped.flip(dims=[3])) / 2
    return feat.float()


def upsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size, mode="bilinear", align_corners=False)
