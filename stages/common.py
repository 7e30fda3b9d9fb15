"""What every stage shares: the run context (backbone, settings, artifact paths), AMP, features."""
from __future__ import annotations

import argparse
import contextlib
import functools
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from loader.dataloader import get_dataset
from loader.datasets_table import DATASETS
from loader.fingerprint import data_fingerprint
from models import load_backbone
from stages.predict import upsample
from stages.settings import Derived, derive
from utils.config import ArtifactPaths, build_parser, checkpoint_stem
from utils.distributed import DistInfo, launch
from utils.errors import StoppedByUser, UserError
from utils.hf_hub import weights_file
from stages.recipe import PUBLISHED_REPLICAS, check_processes, recipe_precision, resolve_switches


# Flags that change what a training stage produces (besides the shared and head settings).
TRAINING_FLAGS = ("epoch", "lr", "batch_size", "seed", "grid", "max_steps")
# The split each script reads (training stages: "train"); segment_images reads --input, not the dataset.
READS_SPLIT = {"test_mlp": "val", "test_tr": "val", "test_kmeans": "val", "segment_images": None}


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Amp:
    """Autocast policy from --precision: fp32 (none), bf16, or fp16 with a loss scaler (CPU and CUDA)."""
    device: torch.device
    dtype: torch.dtype | None

    @staticmethod
    def for_device(device: torch.device, precision: str = "auto") -> "Amp":
        """auto: bf16 on CUDA where supported, fp16 on other CUDA GPUs, fp32 on CPU."""
        if precision == "auto":
            if device.type != "cuda":
                return Amp(device, None)
            return Amp(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("--precision bf16: this GPU has no bf16 support; use fp16 or fp32")
        return Amp(device, PRECISIONS[precision])

    @property
    def name(self) -> str:
        return next(k for k, v in PRECISIONS.items() if v == self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


@dataclass
class Run:
    args: argparse.Namespace
    dist: DistInfo
    structure: str | None         # "MLP", "TR" or None (mediator)
    backbone: torch.nn.Module
    derived: Derived
    paths: ArtifactPaths
    amp: Amp
    precision_fallback: str | None = None  # why the recipe's fp16 was replaced (CPU), recorded in the JSON

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def backbone_file(self) -> Path:
        """The backbone's weights file (a Hugging Face folder's or id's model.safetensors), for provenance."""
        return weights_file(self.args.ckpt)

    @property
    def recipe(self) -> bool:
        """--published_recipe: this process trains one unsynchronised replica (see stages/recipe.py)."""
        return bool(self.args.published_recipe)

    @property
    def replicas(self) -> int:
        """Shards of the training split and learning-rate scale: the published 4 under the recipe."""
        return PUBLISHED_REPLICAS if self.recipe else self.dist.world_size

    @property
    def lr(self) -> float:
        return self.args.lr * self.replicas

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    def shared_settings(self) -> dict[str, Any]:
        """Settings every artifact of this run must agree on with the artifacts it reads."""
        a = self.args
        return {**self.data_identity,
                "dataset": a.dataset, "backbone": self.derived.backbone_name, "ckpt": checkpoint_stem(a.ckpt),
                "published_12_heads": a.published_12_heads, "published_recipe": a.published_recipe,
                "num_codebook": a.num_codebook,
                "embed_dim": self.derived.embed_dim, "n_classes": self.derived.n_classes}

    @functools.cached_property
    def data_identity(self) -> dict[str, str]:
        """The data folder (resolved) and a fingerprint of the split this script reads (`data.train`, the
        pre-cropped set where there is one, or `data.val`); empty for segment_images."""
        split = READS_SPLIT.get(self.args.stage, "train")
        if split is None:
            return {}
        files = self.dataset(split, self.derived.test_resolution).files
        return {"data_dir": str(Path(self.args.data_dir).resolve()),
                f"data.{split}": data_fingerprint(files, self.args.data_dir)}

    def head_settings(self) -> dict[str, Any]:
        """Settings of the segment head (stage 2 onwards)."""
        s = {"structure": self.structure, "reduced_dim": self.args.reduced_dim,
             "projection_dim": self.args.projection_dim}
        if self.structure == "TR":
            s["train_resolution"] = self.derived.train_resolution
        return s

    def training_settings(self) -> dict[str, Any]:
        """How this stage trains, keyed `<stage>.<flag>` so that an artifact a later stage rewrites keeps both."""
        a = self.args
        values = {k: getattr(a, k) for k in TRAINING_FLAGS}
        values.update(lr=self.lr, precision=self.amp.name, published_loss_precision=self.recipe,
                      train_resolution=self.derived.train_resolution)
        if self.precision_fallback:
            values["precision_fallback"] = self.precision_fallback
        if not self.recipe:  # a recipe replica's result does not depend on how many run beside it
            values["world_size"] = self.dist.world_size
        return {f"{a.stage}.{k}": v for k, v in values.items()}

    def flags(self) -> dict[str, Any]:
        return dict(vars(self.args))

    def dataset(self, split: str, resolution: int, cropped: bool = True):
        a = self.args
        crop = self.derived.settings.crop_type if (split == "train" and cropped) else None
        kwargs = {"n_classes": self.derived.n_classes, "skip_bad_images": a.skip_bad_images} \
            if a.dataset == "directory" else {}
        dataset = get_dataset(a.dataset, a.data_dir, split, resolution, crop_type=crop, **kwargs)
        for note in dataset.files.notes:
            self.log(note)
        return dataset

    @torch.no_grad()
    def features(self, img: torch.Tensor) -> torch.Tensor:
        """Frozen backbone patch tokens (B, N, D) in fp32, computed under the AMP policy."""
        with self.amp.autocast():
            feat = self.backbone(img.to(self.device, non_blocking=True))  # (B, N, D)
        return feat.float()


def setup_run(args: argparse.Namespace, dist: DistInfo, structure: str | None) -> Run:
    resolve_switches(args)
    check_processes(args.published_recipe, dist.world_size)
    torch.manual_seed(args.seed + dist.rank)
    backbone = load_backbone(args.ckpt, published_12_heads=args.published_12_heads).to(dist.device)
    name = getattr(backbone, "name", checkpoint_stem(args.ckpt))
    derived = derive(args, structure, backbone.patch_size, backbone.embed_dim, name)
    paths = ArtifactPaths.of(args, checkpoint_stem(args.ckpt), structure)
    precision, fallback = args.precision, None
    if args.published_recipe:
        precision, fallback = recipe_precision(args.precision, dist.device.type)
    run = Run(args=args, dist=dist, structure=structure, backbone=backbone, derived=derived,
              paths=paths, amp=Amp.for_device(dist.device, precision), precision_fallback=fallback)
    if fallback:
        run.log(f"note: {fallback}")
    return run


def tokens_to_map(tokens: torch.Tensor, img: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Tokens (B, N, C) of images (B, 3, H, W) -> map (B, C, H / patch, W / patch), any aspect."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, img.shape[-2] // patch_size, img.shape[-1] // patch_size)


def linear_probe_loss(logits: torch.Tensor, label: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of (B, C, h, w) logits upsampled to the (B, H, W) labels; labels outside [0, C) ignored.

    Returns (loss, accuracy); both are 0 when the batch has no valid label (e.g. unlabeled data)."""
    logits = upsample(logits.float(), tuple(label.shape[-2:]))
    label = label.to(logits.device)
    valid = (label >= 0) & (label < n_classes)  # (B, H, W)
    if not valid.any():
        zero = logits.sum() * 0.0
        return zero, zero.detach()
    flat = logits.permute(0, 2, 3, 1)[valid]  # (M, C)
    target = label[valid]
    loss = F.cross_entropy(flat, target)
    acc = (flat.argmax(-1) == target).float().mean()
    return loss, acc.detach()


def cli(stage: str, structure: str | None, body: Callable[[Run], None], argv: list[str] | None = None) -> None:
    """Entry point of every script: parse flags, launch the processes, turn UserError into one line + exit 2."""
    args = build_parser(stage, DATASETS).parse_args(argv)
    args.stage = stage
    try:
        launch(functools.partial(_worker, args, structure, body), args.device, args.gpu, args.distributed,
               args.port, args.dist_timeout)
    except StoppedByUser as e:
        print(f"interrupted: the training state is saved in {Path(e.state_path).absolute()}; resume with: "
              f"{resume_command(argv)}", file=sys.stderr, flush=True)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted before a training state was saved; one saved earlier, if any, is kept "
              "(--resume continues it)", file=sys.stderr, flush=True)
        sys.exit(130)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except torch.multiprocessing.ProcessExitedException as e:
        print(f"error: a worker process exited with status {e.exit_code}; see its message above", file=sys.stderr)
        sys.exit(2)


def resume_command(argv: list[str] | None) -> str:
    """The command line of this run with --resume, quoted for a POSIX shell."""
    flags = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([sys.executable, sys.argv[0], *flags, *(["--resume"] if "--resume" not in flags else [])])


def _worker(args: argparse.Namespace, structure: str | None, body: Callable[[Run], None], dist: DistInfo) -> None:
    try:
        body(setup_run(args, dist, structure))
    except UserError as e:
        if dist.world_size > 1:  # the launcher reports the exit; say why from the rank that failed
            print(f"error (rank {dist.rank}): {one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise


def one_line(e: UserError) -> str:
    """The message of `e`; raised in a DataLoader worker, it arrives as that worker's traceback, ending with it."""
    lines = str(e).strip().splitlines() or [""]
    return lines[-1].removeprefix(f"{UserError.__module__}.{UserError.__qualname__}: ")


def require(path: Path, what: str, how: str) -> Path:
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {Path(path).absolute()} (expected from an earlier stage: run {how} first)")
    return Path(path)
