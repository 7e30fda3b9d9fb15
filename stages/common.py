"""What every stage shares: the run context (backbone, settings, artifact paths), AMP, features."""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from loader.dataloader import get_dataset
from loader.fingerprint import data_fingerprint
from models import load_backbone
from stages.stops import one_line, report_interrupt, report_stop
from stages.feature_cache import CachedFeatures, lossy_settings
from stages.predict import upsample
from stages.settings import Derived, derive
from utils.config import ArtifactPaths, checkpoint_stem
from utils.distributed import DistInfo, launch
from utils.errors import StoppedByUser, UserError, stop_signal
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
    excluded: set[str] = field(default_factory=set)  # images left out as unusable, relative to --data_dir
    logged: set[str] = field(default_factory=set)    # data notes already printed (each is printed once)
    stop_signal: int | None = None  # a stop signal that came during the last step: said once the artifact is written
    feature_cache: CachedFeatures | None = None  # --feature_cache: set by stages.feature_cache.open_feature_cache

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
                **({"num_codebook": a.num_codebook} if "num_codebook" in a else {}),
                "embed_dim": self.derived.embed_dim, "n_classes": self.derived.n_classes}

    @functools.cached_property
    def data_identity(self) -> dict[str, str]:
        """The data folder (resolved) and a fingerprint of the split this script reads (`data.train`, the
        pre-cropped set where there is one, or `data.val`); empty for segment_images."""
        split = READS_SPLIT.get(self.args.stage, "train")
        if split is None:
            return {}
        resolution = self.derived.train_resolution if split == "train" else self.derived.test_resolution
        files = self.dataset(split, resolution).files  # its notes (e.g. images enlarged) at the size in force
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
        values.update(lossy_settings(a))
        if not self.recipe:  # a recipe replica's result does not depend on how many run beside it
            values["world_size"] = self.dist.world_size
        return {f"{a.stage}.{k}": v for k, v in values.items()}

    def flags(self) -> dict[str, Any]:
        return dict(vars(self.args))

    def dataset(self, split: str, resolution: int, cropped: bool = True):
        """The split as get_dataset reads it; its notes printed once per run, its left-out files kept in
        `excluded` (the provenance JSON records them)."""
        a = self.args
        crop = self.derived.settings.crop_type if (split == "train" and cropped) else None
        classes = {"n_classes": a.n_classes} if a.dataset == "directory" else {}  # counted as derive() did
        dataset = get_dataset(a.dataset, a.data_dir, split, resolution, crop_type=crop, **classes,
                              skip_bad_images=a.skip_bad_images, min_side=self.derived.patch_size)
        for note in dataset.files.notes:
            self.log_once(note)
        self.excluded.update(Path(os.path.relpath(p, a.data_dir)).as_posix() for p in dataset.files.excluded)
        return dataset

    def note_same_folder_val(self) -> None:
        """Say (once) that a directory dataset is scored on the folder it trains on."""
        if self.args.dataset == "directory":
            self.log_once(f"note: a directory dataset's val split is its training folder "
                          f"({Path(self.args.data_dir).absolute()}): the scores, the linear probe's above all "
                          f"(trained on these labels), measure fit to that folder, not results on unseen images")

    def log_once(self, message: str) -> None:
        if message not in self.logged:
            self.logged.add(message)
            self.log(message)

    def data_record(self) -> dict[str, Any]:
        """What the provenance JSON records about the data beyond the compared settings: the images left
        out as unusable (--skip_bad_images), by this run and by the interrupted run it resumed."""
        record: dict[str, Any] = {"excluded_images": sorted(self.excluded)} if self.excluded else {}
        if self.feature_cache is not None:
            record["feature_cache"] = self.feature_cache.record()
        return record

    @torch.no_grad()
    def features(self, img: torch.Tensor) -> torch.Tensor:
        """Frozen backbone patch tokens (B, N, D) in fp32, computed under the AMP policy."""
        with self.amp.autocast():
            feat = self.backbone(img.to(self.device, non_blocking=True))  # (B, N, D)
        return feat.float()

    def train_features(self, batch: dict) -> torch.Tensor:
        """Backbone features (B, N, D) of a training batch: from the feature cache when the run has one
        (stages/feature_cache.py), else computed."""
        if self.feature_cache is not None:
            return self.feature_cache(batch)
        return self.features(batch["img"])


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


def launch_stage(args: argparse.Namespace, structure: str | None, body: Callable[[Run], None],
                 argv: list[str] | None) -> None:
    """Run `body` in every process of the run (stages/cli.py calls this once the flags are parsed).

    A spawned rank that stopped on a signal has printed the resume line (rank 0) and exited with
    128 + the signal: this process exits with the same status, quietly."""
    try:
        launch(functools.partial(_worker, args, structure, body, argv), args.device, args.gpu, args.distributed,
               args.port, args.dist_timeout)
    except torch.multiprocessing.ProcessExitedException as e:
        if e.exit_code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            sys.exit(e.exit_code)
        print(f"error: a worker process exited with status {e.exit_code}; see its message above", file=sys.stderr)
        sys.exit(2)


def _worker(args: argparse.Namespace, structure: str | None, body: Callable[[Run], None], argv: list[str] | None,
            dist: DistInfo) -> None:
    try:
        run = setup_run(args, dist, structure)
        body(run)
        if run.stop_signal is not None and dist.is_main:
            print(f"stopped ({signal.Signals(run.stop_signal).name}) during the last step: the stage finished "
                  f"and its artifact is saved (exit 0); the next stage starts from it", file=sys.stderr, flush=True)
    except KeyboardInterrupt as e:
        if dist.world_size > 1:  # one line from rank 0, the same status from every rank (torchrun, spawn)
            if dist.is_main:
                if isinstance(e, StoppedByUser):
                    report_stop(e, argv)
                else:
                    report_interrupt(args.stage, stop_signal(e))
            sys.exit(128 + stop_signal(e))
        raise
    except UserError as e:
        if dist.world_size > 1:  # the launcher reports the exit; say why from the rank that failed
            print(f"error (rank {dist.rank}): {one_line(e)}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise


def require(path: Path, what: str, how: str) -> Path:
    if not Path(path).is_file():
        raise UserError(f"{what} not found: {Path(path).absolute()} (expected from an earlier stage: run {how} first)")
    return Path(path)
