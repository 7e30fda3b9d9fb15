"""Segmenting your own images (segment_images.py) with trained CAUSE artifacts, through `Segmenter`.

Working size and prediction: see stages/segmenter.py (the one code path of the script and the Python API).

Per image <name> under --out, at the image's displayed size (EXIF orientation applied): <name>_seg.png (colour
map), <name>_overlay.png (colour map blended on the image), <name>_labels.png (ids: 8-bit PNG, 16-bit above 256
ids). Ids are raw
cluster ids: the Hungarian matching needs labels. --matched true maps them to class ids with
the assignment test_{mlp,tr}.py recorded in the test split's metrics.json. Raw cluster ids are
painted in cluster colours (`utils.visualize.cluster_palette`, none of them a class colour),
matched ids in the class colours. legend.png gives the colour of each cluster (or class, with
--matched) and of unmatched pixels.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from loader.checks import check_files
from loader.files import FileList, is_image_name, read_image, read_list
from loader.layouts import directory_images
from stages.cli import cli, structure_flag
from stages.common import Run
from stages.segmenter import Segmenter, load_assignment
from utils.errors import UserError
from utils.io import atomic_write, ensure_writable_dir
from utils.visualize import cluster_palette, colorize, save_image, save_legend

OVERLAY_ALPHA = 0.5


def main(argv: list[str] | None = None) -> None:
    """segment_images.py: the structure flag picks which trained head the run loads."""
    cli("segment_images", structure_flag, segment_images, argv)


@torch.no_grad()
def segment_images(run: Run) -> None:
    args = run.args
    images = list_inputs(Path(args.input), Path(args.out), args.skip_bad_images, run.log)
    images = images[run.dist.rank::run.dist.world_size]  # each rank its share
    if args.matched:
        load_assignment(run, args.crf)  # a missing or stale evaluation stops before the model loads
    segmenter = Segmenter.from_run(run)
    out = ensure_writable_dir(Path(args.out))
    if args.matched:
        names, palette = list(segmenter.class_names), segmenter.palette
    else:
        names = [f"cluster {i}" for i in range(segmenter.n_classes)]
        palette = cluster_palette(segmenter.n_classes, segmenter.palette)
    if run.dist.is_main:
        save_legend(out / "legend.png", names, palette)
    for path, name in tqdm(images, desc="[segment]", disable=not run.dist.is_main):
        image = read_image(path, own=True)
        ids = segmenter.predict(image, crf=args.crf, matched=args.matched)[0]  # (H, W)
        write_outputs(out / name, np.asarray(image), ids.cpu().numpy(), palette)
    run.log(f"wrote the segmentations to {out}")


def list_inputs(path: Path, out: Path, skip_bad: bool = False,
                log: Callable[[str], None] = print) -> list[tuple[Path, str]]:
    """(image, output name) pairs from an image file, a folder (its images found as the directory
    dataset finds them: under `images/` when it exists, recursively, leaving out `out`; names keep the
    sub-folders) or a .txt list of paths (one a line, relative to the list's folder).

    Every image is decoded first. Files of a folder that are not images, and (with `skip_bad`) unusable
    images, are left out and `log`ged; otherwise an unusable image stops the run before any is segmented."""
    notes: tuple[str, ...] = ()
    folder = path
    if path.is_dir():
        folder, found = directory_images(path)
        images = [p for p in found.images if not p.resolve().is_relative_to(out.resolve())]
        if not images:
            raise UserError(f"no images found under {folder.absolute()} outside the output folder {out.absolute()}")
        notes = found.note(folder)
    elif not path.is_file():
        raise UserError(f"--input {path.absolute()} not found: expected an image, a folder of images or a .txt list")
    elif is_image_name(path):
        images = [path]
    elif path.suffix.lower() == ".txt":
        images = [p if p.is_absolute() else path.parent / p for p in map(Path, read_list(path))]
        missing = next((p for p in images if not p.is_file()), None)
        if missing is not None:
            raise UserError(f"image {missing.absolute()} listed in {path.absolute()} not found")
    else:
        raise UserError(f"--input {path.absolute()}: expected an image (a format Pillow opens), a folder "
                        "or a .txt list")
    checked = check_files(FileList(images, None, notes), folder if path.is_dir() else path.parent, skip_bad,
                          own=True).files
    for note in checked.notes:
        log(note)
    images = list(checked.images)
    if path.is_dir():
        pairs = [(p, str(p.relative_to(folder).with_suffix(""))) for p in images]
    else:
        pairs = [(p, p.stem) for p in images]
    twice = next((n for n, count in Counter(name for _, name in pairs).items() if count > 1), None)
    if twice is not None:
        raise UserError(f"--input {path} has several images named {twice} (other suffix or folder); "
                        "outputs are named after the images, so names must be unique")
    return pairs


def write_outputs(stem: Path, rgb: np.ndarray, ids: np.ndarray, palette: np.ndarray) -> None:
    """<stem>_seg.png, <stem>_overlay.png and <stem>_labels.png for an (H, W, 3) image and (H, W) ids.

    Ids of -1 (unmatched clusters) are IGNORE_COLOR in the pictures and the largest value of the label
    file's type (255, or 65535 in a 16-bit file) in <stem>_labels.png."""
    colour = colorize(ids, palette)
    save_image(Path(f"{stem}_seg.png"), colour)
    blend = (1 - OVERLAY_ALPHA) * rgb.astype(np.float32) + OVERLAY_ALPHA * colour.astype(np.float32)
    save_image(Path(f"{stem}_overlay.png"), np.round(blend).astype(np.uint8))
    dtype = np.uint8 if ids.max(initial=0) < 255 else np.uint16
    labels = np.where(ids < 0, np.iinfo(dtype).max, ids).astype(dtype)
    atomic_write(Path(f"{stem}_labels.png"), lambda tmp: Image.fromarray(labels).save(tmp, format="PNG"))
