"""The one flag parser of every script, and the values derived from checkpoint and dataset."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from utils.datasets_table import DATASETS, DatasetSettings, round_to_patch
from utils.errors import UserError

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


def default_num_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


def build_parser(stage: str) -> argparse.ArgumentParser:
    """Upstream flag names and defaults, plus --device, --seed, --output_dir and the reliability flags."""
    p = argparse.ArgumentParser(description=f"CAUSE {stage.replace('_', ' ')}")
    data = p.add_argument_group("data and backbone")
    data.add_argument("--dataset", default="cocostuff27", choices=sorted(DATASETS),
                      help="which dataset (utils/datasets_table.py)")
    data.add_argument("--data_dir", default="data", help="dataset root (STEGO layout); for 'directory', your folder")
    data.add_argument("--n_classes", type=int, default=None, help="classes of a 'directory' dataset")
    data.add_argument("--ckpt", default="checkpoint/dino_vit_base_8.pth",
                      help="backbone checkpoint; its name <family>_vit_<size>_<patch>.pth selects the model")
    data.add_argument("--published_12_heads", type=str2bool, default=None,
                      help="build DINO ViT-S with 12 heads as the published code does "
                           "(needed for the published ViT-S heads; default: false, true under --published_recipe)")
    data.add_argument("--train_resolution", type=int, default=None,
                      help="default per dataset/structure; DINOv2 rounds to 322")
    data.add_argument("--test_resolution", type=int, default=None, help="default 320 (DINOv2 322)")
    data.add_argument("--num_workers", type=int, default=default_num_workers(),
                      help="data-loading processes (default: min(8, CPUs - 1))")
    data.add_argument("--batch_size", type=int, default=16, help="images per process and step")

    model = p.add_argument_group("model")
    model.add_argument("--num_codebook", type=int, default=2048, help="K, concepts of the mediator codebook")
    model.add_argument("--reduced_dim", type=int, default=90, help="r, width of the segment features")
    model.add_argument("--projection_dim", type=int, default=2048, help="p, width of the contrastive projection")
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
    train.add_argument("--epoch", type=int, default=STAGE_EPOCHS[stage],
                       help="epochs of this stage (published default)")
    train.add_argument("--lr", type=float, default=1e-3,
                       help="per-process learning rate; scaled by the world size (by 4 under --published_recipe)")
    train.add_argument("--max_steps", type=int, default=None, help="stop each epoch after this many steps (quick runs)")
    train.add_argument("--seed", type=int, default=0, help="seeds sampling, dropout, initialisation and data order")
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
        train.add_argument("--val_images", type=int, default=None,
                           help="validate on the first N val images only (quick runs; default: all)")
    train.add_argument("--save_every", type=int, default=0,
                       help="also save the resumable state every N steps (0: epoch ends only)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its saved state")
    train.add_argument("--overwrite", action="store_true", help="replace an existing artifact of this stage")
    train.add_argument("--max_nonfinite", type=int, default=5, help="stop after this many non-finite losses in a row")

    ev = p.add_argument_group("evaluation")
    ev.add_argument("--crf_workers", type=int, default=None, help="CRF processes (default: CPU count; 0: serial)")
    ev.add_argument("--results_dir", default="results", help="where test scripts write pictures and metrics.json")
    ev.add_argument("--save_images", type=int, default=-1,
                    help="write pictures and raw maps for images with index below this (-1: all, 0: none)")
    if stage in ("test_mlp", "test_tr", "segment_images"):
        ev.add_argument("--segment", default=None,
                        help="segment head file (default: segment_{mlp,tr}.pth under --output_dir)")
        ev.add_argument("--cluster", default=None,
                        help="cluster file (default: cluster_{mlp,tr}.pth under --output_dir)")
    if stage == "test_kmeans":
        ev.add_argument("--kmeans_samples", type=int, default=200_000,
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
    run.add_argument("--port", default="12355", help="rendezvous port of the processes spawned from --gpu")
    run.add_argument("--dist_timeout", type=float, default=1800.0, help="seconds a rank waits for the others")
    run.add_argument("--output_dir", default="CAUSE", help="root of the artifacts (codebook, heads, probe)")
    run.add_argument("--log_dir", default="logs", help="TensorBoard scalars")
    return p


@dataclass(frozen=True)
class Derived:
    """Values that follow from the flags, the checkpoint and the dataset."""
    backbone_name: str
    patch_size: int
    embed_dim: int
    n_classes: int
    settings: DatasetSettings
    train_resolution: int
    test_resolution: int


def derive(args: argparse.Namespace, structure: str | None, patch_size: int, embed_dim: int,
           backbone_name: str) -> Derived:
    """Resolutions per dataset and structure (rounded up to the patch), classes per dataset."""
    settings = DATASETS[args.dataset]
    n_classes = settings.n_classes
    if args.dataset == "directory" and args.n_classes is not None:
        n_classes = args.n_classes
    elif args.n_classes is not None and args.n_classes != settings.n_classes:
        raise UserError(f"--n_classes {args.n_classes} does not fit {args.dataset}, "
                        f"which has {settings.n_classes} classes")
    default_train = settings.train_resolution_mlp if structure == "MLP" else settings.train_resolution_tr
    train_res = args.train_resolution or round_to_patch(default_train, patch_size)
    test_res = args.test_resolution or round_to_patch(settings.test_resolution, patch_size)
    for flag, res in (("--train_resolution", train_res), ("--test_resolution", test_res)):
        if res % patch_size:
            raise UserError(f"{flag} {res} is not divisible by the backbone patch size {patch_size} "
                            f"(try {round_to_patch(res, patch_size)})")
    return Derived(backbone_name=backbone_name, patch_size=patch_size, embed_dim=embed_dim, n_classes=n_classes,
                   settings=settings, train_resolution=train_res, test_resolution=test_res)


@dataclass(frozen=True)
class ArtifactPaths:
    """The published code's artifact layout under --output_dir and --results_dir."""
    codebook: Path
    segment: Path
    cluster: Path
    results: Path

    @staticmethod
    def of(args: argparse.Namespace, backbone_name: str, structure: str | None) -> "ArtifactPaths":
        out, k = Path(args.output_dir) / args.dataset, str(args.num_codebook)
        tag = (structure or "mlp").lower()
        return ArtifactPaths(
            codebook=out / "modularity" / backbone_name / k / "modular.npy",
            segment=out / backbone_name / k / f"segment_{tag}.pth",
            cluster=out / backbone_name / k / f"cluster_{tag}.pth",
            results=Path(args.results_dir) / args.dataset / (structure or "MLP") / backbone_name / k,
        )


def checkpoint_stem(ckpt: str) -> str:
    return Path(ckpt).name.split(".")[0]
