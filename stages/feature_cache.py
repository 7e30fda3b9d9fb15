"""--feature_cache DIR: the frozen backbone's training features, computed once and read back.

The training input of every stage is deterministic per image (loader/transforms.py: resize and
centre-crop, no random augmentation; the randomness of a step, grid sampling and dropout, acts on
the features), so the backbone output of image `i` at one resolution is the same in every stage,
epoch and seed. The first stage that meets an image computes its features as it trains and writes
them; later batches, epochs, stages, rows and seeds with the same key read them.

Layout: `DIR/<16 hex of the key>/` holds `meta.json` (the whole key) and shards: each step that
computed features writes `shard-<rank>-<random>.npy` (B', N, D) then `shard-<...>.idx.npy` (B',) with
the dataset indices, both atomically; a shard counts once its index file exists, so an interrupted
build keeps every shard written before it and the next run computes only what is missing. Reads go
through memory-mapped `.npy` files (at most `OPEN_SHARDS` open at once): RAM stays bounded, and any
process (DDP ranks, the rows of reproduce.py) reads whatever images its sampler hands it.

The key holds everything the features depend on (`cache_key`); another key is another folder, and
a folder whose meta.json holds another key is emptied and rebuilt, never read.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from loader.fingerprint import content_key
from utils.errors import UserError
from utils.io import file_sha256, read_json, read_provenance, save_json, save_numpy



class Run(Protocol):
    """What the cache reads of a stage's run (stages.common.Run; named here, not imported, since that module
    imports this one)."""
    args: argparse.Namespace
    derived: Any
    amp: Any
    dist: Any
    backbone_file: Path
    feature_cache: Any

    @property
    def device(self) -> torch.device: ...
    def features(self, img: torch.Tensor) -> torch.Tensor: ...
    def log(self, message: str) -> None: ...

CACHE_FORMAT = 1
OPEN_SHARDS = 64  # memory maps kept open per process (each holds a file descriptor)
# cache dtype -> (numpy storage dtype, torch dtype); bf16 is stored as its raw 16 bits
DTYPES: dict[str, tuple[type, torch.dtype]] = {"fp32": (np.float32, torch.float32),
                                               "fp16": (np.float16, torch.float16),
                                               "bf16": (np.int16, torch.bfloat16)}


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of `path` (a seam: tests replace it)."""
    return shutil.disk_usage(path).free


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_flags(args: argparse.Namespace) -> None:
    """--feature_cache_dtype other than fp32 without --feature_cache would be ignored: refuse it."""
    if getattr(args, "feature_cache", None) is None and getattr(args, "feature_cache_dtype", "fp32") != "fp32":
        raise UserError(f"--feature_cache_dtype {args.feature_cache_dtype} needs --feature_cache DIR "
                        f"(without a cache the features are the backbone's fp32 output)")


def lossy_settings(args: argparse.Namespace) -> dict[str, str]:
    """The training setting a rounded cache adds (`feature_cache_dtype`, recorded as
    `<stage>.feature_cache_dtype`): an fp16/bf16 cache changes what a stage learns, an fp32 one does not
    (a row trained from it equals the row trained without it)."""
    check_flags(args)
    dtype = getattr(args, "feature_cache_dtype", "fp32")
    return {} if dtype == "fp32" else {"feature_cache_dtype": dtype}


def rounded_features_missing(recorded: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The `<stage>.feature_cache_dtype` settings an artifact records and this run lacks: it was trained on
    rounded cached features, this run would train on exact ones (the usual comparison of settings only
    compares those present on both sides)."""
    return [f"{k}: artifact has {recorded[k]!r}, this run has fp32 (exact) features"
            for k in sorted(recorded) if k.endswith(".feature_cache_dtype") and k not in settings]


def transform_name(square_resize: bool) -> str:
    """The image transform of loader/transforms.py, as the key names it."""
    geometry = "resize to a square" if square_resize else "resize short side + centre crop"
    return f"{geometry}, nearest; ImageNet mean/std"


def cache_key(run: Run, dataset) -> dict[str, Any]:
    """Everything the cached features of `dataset` (the training split this run reads) depend on."""
    a = run.args
    side = dataset.resolution // run.derived.patch_size
    return {"format": CACHE_FORMAT, "backbone": run.derived.backbone_name,
            "backbone_sha256": file_sha256(run.backbone_file), "published_12_heads": bool(a.published_12_heads),
            "dataset": a.dataset, "split": "train", "crop_type": run.derived.settings.crop_type,
            "data": content_key(dataset.files, a.data_dir), "images": len(dataset),
            "resolution": dataset.resolution, "transform": transform_name(dataset.square_resize),
            "precision": run.amp.name, "device": run.device.type, "dtype": a.feature_cache_dtype,
            "tokens": side * side, "dim": run.derived.embed_dim}


def key_hex(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class FeatureStore:
    """The shards of one key under `folder`: which images are cached, reading and writing them."""

    def __init__(self, folder: Path, key: dict[str, Any], rank: int = 0):
        self.folder, self.key, self.rank = Path(folder), key, rank
        self.hex = key_hex(key)
        self.np_dtype, self.torch_dtype = DTYPES[key["dtype"]]
        self.where: dict[int, tuple[str, int]] = {}  # dataset index -> (shard name, row)
        self.maps: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.scanned_at: int | None = None  # the folder's mtime at the last scan
        self.seen: set[str] = set()  # shards already in `where`

    @property
    def image_bytes(self) -> int:
        return self.key["tokens"] * self.key["dim"] * np.dtype(self.np_dtype).itemsize

    def prepare(self) -> str | None:
        """Create the folder and meta.json; a folder that holds another key is emptied (rebuilt). Returns a
        line saying so, or None."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        recorded = read_json(meta, "feature cache record")
        note = None
        if recorded is not None and recorded.get("key") != self.key:
            for shard in self.folder.glob("shard-*.npy"):
                shard.unlink(missing_ok=True)
            note = f"feature cache {self.folder} held features of another key: rebuilt"
        if recorded is None or note is not None:
            save_json({"key": self.key, "key_hex": self.hex}, meta)
        self.scan()
        return note

    def scan(self) -> None:
        """Read the index files of shards written since the last scan (by any process); nothing when the
        folder did not change."""
        stamp = os.stat(self.folder).st_mtime_ns
        if stamp == self.scanned_at:
            return
        self.scanned_at = stamp
        for idx_file in sorted(self.folder.glob("shard-*.idx.npy")):
            name = idx_file.name.removesuffix(".idx.npy")
            if name not in self.seen:
                self._add(name, np.load(idx_file).tolist())

    def _add(self, name: str, indices: list[int]) -> None:
        self.seen.add(name)
        for row, i in enumerate(indices):
            self.where.setdefault(i, (name, row))

    def _map(self, name: str) -> np.ndarray:
        """The shard's (B', N, D) memory map; the least recently used one is closed past OPEN_SHARDS."""
        if name in self.maps:
            self.maps.move_to_end(name)
        else:
            self.maps[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
            if len(self.maps) > OPEN_SHARDS:
                self.maps.popitem(last=False)
        return self.maps[name]

    def read(self, indices: list[int]) -> torch.Tensor:
        """Features (B, N, D) of cached images, in the cache dtype (CPU)."""
        rows = np.stack([self._map(name)[row] for name, row in (self.where[i] for i in indices)])  # (B, N, D)
        return torch.from_numpy(rows).view(self.torch_dtype)

    def write(self, indices: list[int], feat: torch.Tensor) -> None:
        """Store features (B', N, D) of images not cached yet as one shard (features first, index last)."""
        name = f"shard-{self.rank}-{secrets.token_hex(6)}"
        values = feat.detach().to("cpu", self.torch_dtype).contiguous().view(
            torch.int16 if self.torch_dtype == torch.bfloat16 else self.torch_dtype).numpy().view(self.np_dtype)
        save_numpy(values, self.folder / f"{name}.npy")
        save_numpy(np.asarray(indices, dtype=np.int64), self.folder / f"{name}.idx.npy")
        self._add(name, indices)


class CachedFeatures:
    """Run.train_features under --feature_cache: cached images are read, the others computed and stored.

    Under an fp16/bf16 cache, computed features are rounded to it before use, so every epoch trains on
    the same values whether they were just computed or read back."""

    def __init__(self, run: Run, store: FeatureStore):
        self.run, self.store = run, store
        self.lossy = store.key["dtype"] != "fp32"

    def __call__(self, batch: dict) -> torch.Tensor:
        indices = [int(i) for i in batch["ind"]]
        missing = [j for j, i in enumerate(indices) if i not in self.store.where]
        if missing:
            self.store.scan()  # another process (rank, row) may have written them since
            missing = [j for j, i in enumerate(indices) if i not in self.store.where]
        if not missing:
            return self.store.read(indices).to(self.run.device, non_blocking=True).float()  # (B, N, D)
        img = batch["img"] if len(missing) == len(indices) else batch["img"][missing]
        computed = self.run.features(img)  # (B', N, D) fp32
        if self.lossy:
            computed = computed.to(self.store.torch_dtype).float()
        first = {}  # a padded epoch can hand an image twice: store it once
        for row, j in enumerate(missing):
            first.setdefault(indices[j], row)
        self.store.write(list(first), computed[list(first.values())])
        if len(missing) == len(indices):
            return computed
        feat = torch.empty(len(indices), *computed.shape[1:], device=computed.device)  # (B, N, D)
        feat[missing] = computed
        cached = sorted(set(range(len(indices))) - set(missing))
        feat[cached] = self.store.read([indices[j] for j in cached]).to(computed.device).float()
        return feat

    def record(self) -> dict[str, Any]:
        """The provenance field of artifacts trained from these features."""
        return {"key": self.store.hex, "dtype": self.store.key["dtype"], "dir": str(self.store.folder.resolve())}


def open_feature_cache(run: Run, dataset) -> None:
    """With --feature_cache: check the disk, then make `run.train_features` read and fill the cache of
    `dataset` (this run's training split). Without it: nothing (the backbone runs every step)."""
    check_flags(run.args)
    if run.args.feature_cache is None:
        return
    key = cache_key(run, dataset)
    store = FeatureStore(Path(run.args.feature_cache) / key_hex(key)[:16], key, run.dist.rank)
    try:
        note = store.prepare()
    except OSError as e:
        raise UserError(f"--feature_cache {run.args.feature_cache}: cannot write there ({e.strerror})") from None
    if note:
        run.log(note)
    check_space(run, store, len(dataset))
    run.feature_cache = CachedFeatures(run, store)


def check_space(run: Run, store: FeatureStore, images: int) -> None:
    """Print the cache's size and the free space; stop in one line when what is left to write does not fit."""
    k = store.key
    left = images - len(store.where)
    size, needed, free = images * store.image_bytes, left * store.image_bytes, free_bytes(store.folder)
    run.log(f"feature cache {store.folder}: {images} images x {k['tokens']} tokens x {k['dim']} dim x "
            f"{store.image_bytes // (k['tokens'] * k['dim'])} bytes ({k['dtype']}) = {gib(size)}; "
            f"{len(store.where)} cached, {gib(needed)} left to write; {gib(free)} free")
    if needed > free:
        raise UserError(f"--feature_cache {run.args.feature_cache}: the cache needs {gib(needed)} more but the disk "
                        f"has {gib(free)} free ({needed} > {free} bytes); free space, use another folder, or "
                        f"--feature_cache_dtype fp16")


def head_cache_record(cluster: dict[str, Any] | None, segment: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `feature_cache` field of a trained head, for the metrics.json of its test: from the provenance of
    the cluster probe, of the segment head, or of the stage-2 head it was fine-tuned from (the first that
    has one); None when no stage that made it read cached features."""
    kept = ((segment or {}).get("upstream", {}).get("front_door_segment") or {}).get("path")
    stage2 = read_provenance(Path(kept)) if kept and Path(kept).is_file() else None
    return next((r["feature_cache"] for r in (cluster, segment, stage2) if r and r.get("feature_cache")), None)
