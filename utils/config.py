"""The one flag parser of every script, and the artifact layout it implies."""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from utils.hf_hub import is_hub_id, resolve_hub_id


# Epochs of each stage in the published scripts.
STAGE_EPOCHS = {"mediator": 1, "front_door_mlp": 2, "front_door_tr": 2, "fine_tuning_mlp": 1,
                "fine_tuning_tr": 5, "test_mlp": 0, "test_tr": 0, "test_kmeans": 0, "segment_images": 0}


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("yes", "true", "t", "y", "1"):
        return True
    if v in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false/yes/no), got {value!r}")


class Bounded:
    """argparse `type=` for a number within [lo, hi] (either end may be open: None); the range shows in --help."""

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None, above: bool = False):
        self.kind, self.lo, self.hi, self.above = kind, lo, hi, above  # above: lo itself excluded
        self.__name__ = kind.__name__  # argparse names the type in "invalid <type> value"

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{noun} in [{self.lo}, {self.hi}]"
        if self.lo is not None:
            return f"{noun} {'>' if self.above else '>='} {self.lo}"
        return f"{noun} <= {self.hi}" if self.hi is not None else noun

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        low_ok = self.lo is None or (value > self.lo if self.above else value >= self.lo)
        if not math.isfinite(value) or not low_ok or (self.hi is not None and value > self.hi):
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text}")
        return value


def bounded_int(lo: int | None = None, hi: int | None = None) -> Bounded:
    return Bounded(int, lo, hi)


def positive_float() -> Bounded:
    return Bounded(float, 0.0, above=True)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `error: argument --flag: ...`, exit 2 (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def show_ranges(parser: argparse.ArgumentParser) -> None:
    """Append each bounded flag's range to its help text."""
    for action in parser._actions:
        if isinstance(action.type, Bounded) and action.help:
            action.help += f" [{action.type.describe()}]"


def default_num_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


def build_parser(stage: str, datasets: Sequence[str]) -> argparse.ArgumentParser:
    """Upstream flag names and defaults, plus --device, --seed, --output_dir and the reliability flags.

    `datasets`: the names --dataset accepts (the loader's table, `loader.datasets_table.DATASETS`).
    """
    p = OneLineParser(description=f"CAUSE {stage.replace('_', ' ')}")
    data = p.add_argument_group("data and backbone")
    data.add_argument("--dataset", default="cocostuff27", choices=sorted(datasets),
                      help="which dataset (loader/datasets_table.py)")
    data.add_argument("--data_dir", default="data", help="dataset root (STEGO layout); for 'directory', your folder")
    data.add_argument("--n_classes", type=bounded_int(1), default=None, help="classes of a 'directory' dataset")
    data.add_argument("--skip_bad_images", type=str2bool, default=False,
                      help="'directory': leave out (and list) unreadable images instead of stopping on the first")
    data.add_argument("--ckpt", default="checkpoint/dino_vit_base_8.pth",
                      help="backbone: a checkpoint file (its name, <family>_vit_<size>_<patch>.pth or the official "
                           "release name, selects the model) or a Hugging Face model folder")
    data.add_argument("--published_12_heads", type=str2bool, default=None,
                      help="build DINO ViT-S with 12 heads as the published code does "
                           "(needed for the published ViT-S heads; default: false, true under --published_recipe)")
    data.add_argument("--train_resolution", type=bounded_int(1), default=None,
                      help="default per dataset/structure; DINOv2 rounds to 322")
    data.add_argument("--test_resolution", type=bounded_int(1), default=None, help="default 320 (DINOv2 322)")
    data.add_argument("--num_workers", type=bounded_int(0), default=default_num_workers(),
                      help="data-loading processes (default: min(8, CPUs - 1))")
    data.add_argument("--batch_size", type=bounded_int(1), default=16, help="images per process and step")

    model = p.add_argument_group("model")
    model.add_argument("--num_codebook", type=bounded_int(1), default=2048, help="K, concepts of the mediator codebook")
    model.add_argument("--reduced_dim", type=bounded_int(1), default=90, help="r, width of the segment features")
    model.add_argument("--projection_dim", type=bounded_int(1), default=2048,
                       help="p, width of the contrastive projection")
    model.add_argument("--grid", type=str2bool, default=True, help="stochastic 4x4 grid sampling")
    if stage.startswith("front_door"):
        model.add_argument("--load_segment", type=str2bool, default=False,
                           help="start from the existing segment head of this stage's output path instead of a "
                                "fresh one (needs --overwrite, which replaces it)")
    if stage.startswith("fine_tuning"):
        model.add_argument("--load_segment", type=str2bool, default=True,
                           help="fine-tune the stage-2 segment head (the only choice: false is refused)")
        model.add_argument("--load_cluster", type=str2bool, default=False,
                           help="start from the existing cluster probe of this stage's output path instead of a "
                                "fresh one (needs --overwrite, which replaces it)")

    train = p.add_argument_group("training")
    train.add_argument("--epoch", type=bounded_int(0), default=STAGE_EPOCHS[stage],
                       help="epochs of this stage (published default; 0 saves the untrained artifact, a baseline)")
    train.add_argument("--lr", type=positive_float(), default=1e-3,
                       help="per-process learning rate; scaled by the world size (by 4 under --published_recipe)")
    train.add_argument("--max_steps", type=bounded_int(0), default=None,
                       help="stop each epoch after this many steps (quick runs; 0: no training, a baseline)")
    train.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=0,
                       help="seeds sampling, dropout, initialisation and data order")
    train.add_argument("--published_label_leak", type=str2bool, default=None,
                       help="stage 3 only: let the linear probe's label gradient train the teacher head, "
                            "as the published code does (default: false, true under --published_recipe)")
    train.add_argument("--published_recipe", type=str2bool, default=False,
                       help="train as the published runs did (rank 0 of 4 unsynchronised replicas): lr x 4, "
                            "rank 0's shard of a 4-way DistributedSampler split, own concept bank, fp16 with "
                            "the published loss precision, 12-head DINO ViT-S, label leak, published clipping")
    if stage.startswith(("front_door", "fine_tuning")):
        train.add_argument("--validate", type=str2bool, default=True,
                           help="score the val split after every epoch, as the published scripts do (linear "
                                "probe; fine-tuning also the cluster probe)")
        train.add_argument("--val_images", type=bounded_int(1), default=None,
                           help="validate on the first N val images only (quick runs; default: all)")
    train.add_argument("--save_every", type=bounded_int(0), default=0,
                       help="also save the resumable state every N steps (0: epoch ends only)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its saved state")
    train.add_argument("--overwrite", action="store_true", help="replace an existing artifact of this stage")
    train.add_argument("--max_nonfinite", type=bounded_int(1), default=5,
                       help="stop after this many non-finite losses in a row")

    ev = p.add_argument_group("evaluation")
    ev.add_argument("--crf_workers", type=bounded_int(0), default=None,
                    help="CRF processes (default: CPU count; 0: serial)")
    ev.add_argument("--results_dir", default="results", help="where test scripts write pictures and metrics.json")
    ev.add_argument("--save_images", type=bounded_int(-1), default=-1,
                    help="write pictures and raw maps for images with index below this (-1: all, 0: none)")
    if stage in ("test_mlp", "test_tr", "segment_images"):
        ev.add_argument("--segment", default=None,
                        help="segment head file (default: segment_{mlp,tr}.pth under --output_dir)")
        ev.add_argument("--cluster", default=None,
                        help="cluster file (default: cluster_{mlp,tr}.pth under --output_dir)")
    if stage == "test_kmeans":
        ev.add_argument("--kmeans_samples", type=bounded_int(1), default=200_000,
                        help="patch features of the val split sampled (evenly per image) to fit k-means")
    if stage == "segment_images":
        inf = p.add_argument_group("inference on your images")
        inf.add_argument("--input", required=True, help="an image, a folder of images, or a .txt list of image paths")
        inf.add_argument("--out", required=True,
                         help="folder for <name>_seg.png, <name>_overlay.png, <name>_labels.png")
        inf.add_argument("--structure", default="TR", choices=["MLP", "TR"], help="which trained head to load")
        inf.add_argument("--crf", type=str2bool, default=False,
                         help="refine with the dense CRF (flip-averaged features)")
        inf.add_argument("--matched", type=str2bool, default=False,
                         help="map clusters to classes with the assignment in the test split's metrics.json")

    run = p.add_argument_group("devices and outputs")
    run.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: CUDA when present")
    run.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                     help="autocast dtype (fp16 with a loss scaler); auto: bf16 on CUDA with bf16, fp16 on "
                          "other CUDA GPUs, fp32 on CPU; fp16 under --published_recipe")
    run.add_argument("--gpu", default=None, help="GPU indices, e.g. 0,1,2,3 (one process per GPU)")
    run.add_argument("--distributed", type=str2bool, default=None,
                     help="spawn one process per --gpu entry (default: when more than one GPU is given)")
    run.add_argument("--port", type=bounded_int(1, 65535), default=12355,
                     help="rendezvous port of the processes spawned from --gpu")
    run.add_argument("--dist_timeout", type=positive_float(), default=1800.0,
                     help="seconds a rank waits for the others")
    run.add_argument("--output_dir", default="CAUSE", help="root of the artifacts (codebook, heads, probe)")
    run.add_argument("--log_dir", default="logs", help="TensorBoard scalars")
    show_ranges(p)
    return p


@dataclass(frozen=True)
class ArtifactPaths:
    """The published code's artifact layout under --output_dir and --results_dir."""
    codebook: Path
    segment: Path
    cluster: Path
    results: Path

    @staticmethod
    def of(args: argparse.Namespace, backbone_name: str, structure: str | None) -> "ArtifactPaths":
        out, k = Path(args.output_dir) / dataset_folder(args), str(args.num_codebook)
        tag = (structure or "mlp").lower()
        return ArtifactPaths(
            codebook=out / "modularity" / backbone_name / k / "modular.npy",
            segment=out / backbone_name / k / f"segment_{tag}.pth",
            cluster=out / backbone_name / k / f"cluster_{tag}.pth",
            results=Path(args.results_dir) / dataset_folder(args) / (structure or "MLP") / backbone_name / k,
        )


def dataset_folder(args: argparse.Namespace) -> str:
    """The dataset's folder under --output_dir and --results_dir: its name (the published paths), or for
    `directory` `directory_<folder name>_<8 hex of the resolved folder's sha256>`, so that two folders
    never share an artifact."""
    if args.dataset != "directory":
        return args.dataset
    folder = Path(args.data_dir).resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.name) or "root"
    return f"directory_{name}_{hashlib.sha256(str(folder).encode()).hexdigest()[:8]}"


def checkpoint_stem(ckpt: str) -> str:
    """The backbone's name in artifact paths: the file's stem, or for a Hugging Face id its id and revision."""
    if is_hub_id(ckpt):
        return resolve_hub_id(str(ckpt)).artifact_name
    return Path(ckpt).name.split(".")[0]
