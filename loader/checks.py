"""Decoding every image and label of a file list before any training, cached by the files' identity.

A header check misses a JPEG cut short or a label whose pixels do not fit; this module decodes each
file in full, as the loader will (Pillow `load`, MATLAB files read), and checks each label: 8-bit
(PIL mode L or P), the size of its image, and its largest class id (255 = ignore, left out). The
work runs on threads (Pillow decodes without holding the GIL) and the result, one small record per
image, is kept in `$CAUSE_CACHE/data_checks/<key>.json` (default `~/.cache/cause`), keyed by the
files' paths, sizes and modification times (`loader.fingerprint.content_key`): an unchanged folder
is checked once.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from loader.files import FileList, pair_size_problem, read_image, read_label
from loader.fingerprint import content_key
from utils.errors import UserError
from utils.io import atomic_write

CHECK_VERSION = 2      # bump when the checks change: older cache files are then not read
IGNORE_VALUE = 255     # raw label value of ignored pixels in a directory dataset's labels
SKIP_HINT = "fix or remove it, or pass --skip_bad_images true to leave out unreadable files"


@dataclass(frozen=True)
class Decoded:
    """What decoding one image (and its label) found."""
    problem: str | None = None        # why the pair cannot be used; None when it can
    size: tuple[int, int] = (0, 0)    # image (width, height)
    label_max: int = -1               # largest class id in the label (-1: no label, or only ignored pixels)


@dataclass(frozen=True)
class CheckedFiles:
    files: FileList                   # the usable pairs; notes and `excluded` say what was left out
    sizes: list[tuple[int, int]]      # (width, height) of each kept image
    largest_label: tuple[int, Path] | None  # largest class id of any kept label, and that label's file


def cache_dir() -> Path:
    return Path(os.environ.get("CAUSE_CACHE") or Path.home() / ".cache" / "cause") / "data_checks"


def check_files(files: FileList, root: Path, skip_bad: bool, min_side: int = 1, own: bool = False) -> CheckedFiles:
    """Decode every image and label of `files` (under the data folder `root`); `own`: images read as displayed
    (`loader.files.read_image`), so sizes are the displayed sizes.

    A problem (unreadable file, a label that is not 8-bit or not its image's size, an image with a side
    under `min_side` pixels) stops with UserError naming the file, or with `skip_bad` leaves that pair
    out with one note each, recorded in `files.excluded`."""
    found = _decoded(files, root, own)
    problems = [d.problem or _too_small(d, files.images[i], min_side) for i, d in enumerate(found)]
    bad = [i for i, p in enumerate(problems) if p]
    if bad and not skip_bad:
        raise UserError(f"{problems[bad[0]]}; {SKIP_HINT}")
    keep = [i for i, p in enumerate(problems) if not p]
    if not keep:
        raise UserError(f"none of the {len(files.images)} images can be used: {problems[0]}")
    labels = None if files.labels is None else [files.labels[i] for i in keep]
    largest = max(((found[i].label_max, files.labels[i]) for i in keep if found[i].label_max >= 0),
                  key=lambda pair: pair[0], default=None) if files.labels is not None else None
    kept = replace(files, images=[files.images[i] for i in keep], labels=labels,
                   notes=files.notes + tuple(f"skipped {problems[i]}" for i in bad),
                   excluded=files.excluded + tuple(Path(files.images[i]) for i in bad))
    return CheckedFiles(kept, [found[i].size for i in keep], largest)


def decode_pair(image: Path, label: Path | None, own: bool = False) -> Decoded:
    """Decode `image` (read as `read_image` with `own` reads it) and its `label` (if any) in full; the first
    problem found, or the pair's facts."""
    try:
        size = read_image(image, own).size
    except UserError as e:
        return Decoded(problem=_unusable("image", image, e))
    if label is None:
        return Decoded(size=size)
    try:
        pixels = np.asarray(read_label(label))  # (H, W) uint8
    except UserError as e:
        return Decoded(problem=_unusable("label", label, e))
    if pixels.shape[::-1] != size:
        return Decoded(problem=pair_size_problem(image, label, size, pixels.shape[::-1], own))
    values = pixels[pixels != IGNORE_VALUE]
    return Decoded(size=size, label_max=int(values.max()) if values.size else -1)


def _unusable(what: str, path: Path, e: UserError) -> str:
    """"unreadable image <path> (<reason>)" from read_image's / read_label's message."""
    message = str(e)
    if message.startswith(f"cannot read {what} "):  # "cannot read <what> <path> (<reason>)"
        return "unreadable" + message.removeprefix("cannot read")
    return f"unreadable {what} {Path(path).absolute()} ({message})"


def _too_small(d: Decoded, image: Path, min_side: int) -> str | None:
    if min(d.size) >= min_side:
        return None
    return (f"image {Path(image).absolute()} is {d.size[0]}x{d.size[1]}, smaller than one {min_side}x{min_side} "
            f"patch of the backbone")


def _decoded(files: FileList, root: Path, own: bool) -> list[Decoded]:
    """Decoded record of every image of `files`, from the cache when the files are unchanged."""
    reading = "own" if own else "published"
    path = cache_dir() / f"{content_key(files, root)}-{reading}-v{CHECK_VERSION}.json"
    cached = _read_cache(path, len(files.images))
    if cached is not None:
        return cached
    labels = files.labels if files.labels is not None else [None] * len(files.images)
    workers = min(32, (os.cpu_count() or 1) + 4)
    with ThreadPoolExecutor(workers) as pool:
        found = list(tqdm(pool.map(decode_pair, files.images, labels, [own] * len(labels), chunksize=64),
                          total=len(files.images),
                          desc="[check images]", leave=False, disable=len(files.images) < 500))
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(
            [[d.problem, *d.size, d.label_max] for d in found])))
    except (OSError, UserError):
        pass  # no writable cache: the next run decodes again
    return found


def _read_cache(path: Path, count: int) -> list[Decoded] | None:
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rows, list) or len(rows) != count:
        return None
    return [Decoded(problem, (w, h), label_max) for problem, w, h, label_max in rows]
