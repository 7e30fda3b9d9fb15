"""Loading a trained CAUSE model (ours or the published files) and its segment features."""
from __future__ import annotations

from pathlib import Path

import torch

from modules.segment import Cluster, SegmentMLP, SegmentTR
from stages.artifacts import input_paths, load_state_dict_checked, record_differences
from stages.common import Run, tokens_to_map
from stages.model_folder import MODEL_FLAGS, trained_elsewhere
from stages.predict import FeatureFn
from stages.segments import build_segment
from utils.errors import UserError
from utils.io import file_record


def trained_paths(run: Run) -> tuple[Path, Path]:
    """(segment, cluster) files: --segment / --cluster when given, else the artifact paths."""
    segment, cluster = getattr(run.args, "segment", None), getattr(run.args, "cluster", None)
    return Path(segment or run.paths.segment), Path(cluster or run.paths.cluster)


def load_trained(run: Run) -> tuple[SegmentMLP | SegmentTR, Cluster]:
    """Segment head + cluster probe, in eval mode on the run's device.

    Files without a provenance JSON beside them (the published downloads) load when their keys
    and shapes fit; ours must also have been made with this run's settings, from the backbone
    checkpoint and codebook (when present) of this run, and the cluster probe from this segment file."""
    settings = {**run.shared_settings(), **run.head_settings()}
    tag = run.structure.lower()
    segment_path, cluster_path = trained_paths(run)
    if not segment_path.is_file() and getattr(run.args, "segment", None) is None:
        raise UserError(missing_head(run, segment_path))
    inputs = input_paths(run, "backbone", "codebook")
    segment = build_segment(run)
    load_state_dict_checked(run, segment, segment_path, "segment head", f"front_door_{tag}", settings, inputs)
    cluster = Cluster(run.derived.embed_dim, run.args.reduced_dim, run.args.num_codebook, run.derived.n_classes)
    load_state_dict_checked(run, cluster, cluster_path, "cluster probe", f"fine_tuning_{tag}", settings,
                            {**inputs, "segment": segment_path})
    segment.set_codebook(cluster.codebook.detach())
    return segment.to(run.device).eval(), cluster.to(run.device).eval()


def missing_head(run: Run, path: Path) -> str:
    """The line of a segment head that is not where the flags point, naming the trained models of this dataset
    under --output_dir and the flags that reach them."""
    a = run.args
    caller = getattr(a, "caller", None) or f"{a.stage}.py"
    current = {**{k: getattr(a, k, None) for k in MODEL_FLAGS}, "structure": run.structure,
               "n_classes": run.derived.n_classes if a.dataset == "directory" else None,
               "train_resolution": run.derived.train_resolution}
    elsewhere = trained_elsewhere(Path(a.output_dir), run.structure, current, caller, a.stage == "segment_images")
    return (f"segment head not found: {path.absolute()} (expected from an earlier stage: run "
            f"train_front_door_{run.structure.lower()}.py first){elsewhere}")


def check_report_of_trained(run: Run, report: dict, path: Path) -> None:
    """Stop when `report` (a metrics.json at `path`) was made from other segment/cluster files than the ones
    this run loads (their sha256 differ, or the report records none)."""
    segment, cluster = trained_paths(run)
    diffs = record_differences({"upstream": report.get("upstream", {})}, {},
                               {"segment": file_record(segment), "cluster": file_record(cluster)})
    if diffs:
        raise UserError(f"{path} was made from other trained files ({'; '.join(diffs)}); "
                        f"run test_{run.structure.lower()}.py with the same flags again")


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


def segment_features(run: Run, segment: SegmentMLP | SegmentTR) -> FeatureFn:
    """Teacher segment features (B, r, h, w) of images (B, 3, H, W)."""
    def features(img: torch.Tensor) -> torch.Tensor:
        return tokens_to_map(segment.head_ema(run.features(img)), img, run.derived.patch_size).float()
    return features
