"""Segmenting your own images (segment_images.py) with trained CAUSE artifacts.

Working size. MLP: the image keeps its aspect: short side resized to the test resolution, both
sides rounded to a multiple of the patch. TR: its head has one learned query per patch of its
training grid, so the image is resized to the training square (aspect not kept, as the
published Pascal VOC protocol does). Images are resized nearest-neighbour, as in training.
Prediction at the working size, as the evaluation predicts at label size (features upsampled
bilinearly, cosine to the cluster probe, argmax; with --crf, flip-averaged features and the
dense CRF on the working image); the label map is then resized (nearest) to the original size.

Per image <name> under --out: <name>_seg.png (colour map), <name>_overlay.png (colour map
blended on the image), <name>_labels.png (ids: 8-bit PNG, 16-bit above 256 ids). Ids are raw
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
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from loader.class_names import class_info
from loader.checks import check_files
from loader.files import FileList, is_image_name, read_image, read_list
from loader.layouts import directory_has_labels, directory_images
from loader.transforms import to_normalized_tensor, to_uint8_image
from stages.cli import structure_flag
from stages.common import Run, cli
from stages.evaluate import read_metrics
from stages.predict import predict
from stages.trained import check_report_of_trained, load_trained, segment_features
from utils.crf import CRFPool
from utils.errors import UserError
from utils.io import atomic_write, ensure_writable_dir, settings_mismatch
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
    assignment = load_assignment(run) if args.matched else None
    segment, cluster = load_trained(run)
    info = class_info(args.dataset, run.derived.n_classes if args.dataset == "directory" else None)
    features = segment_features(run, segment)
    out = ensure_writable_dir(Path(args.out))
    if assignment is not None:
        names, palette = list(info.names), info.palette
    else:
        names = [f"cluster {i}" for i in range(run.derived.n_classes)]
        palette = cluster_palette(run.derived.n_classes, info.palette)
    if run.dist.is_main:
        save_legend(out / "legend.png", names, palette)
    with CRFPool(0) as crf:
        for path, name in tqdm(images, desc="[segment]", disable=not run.dist.is_main):
            image = read_image(path)
            size = working_size(run, image.height, image.width)
            work = TF.resize(image, list(size), interpolation=InterpolationMode.NEAREST)
            img = to_normalized_tensor(work)[None]  # (1, 3, h, w)
            pred = predict(features, cluster.cluster_probe, img, size, crf=args.crf)
            if args.crf:
                ids = crf.map([to_uint8_image(img[0])], pred.crf_input.cpu().numpy(), [str(path)])[0]
            else:
                ids = pred.cluster[0].cpu().numpy()
            if assignment is not None:
                ids = assignment[ids]
            write_outputs(out / name, np.asarray(image), resize_ids(ids, (image.height, image.width)), palette)
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
    checked = check_files(FileList(images, None, notes), folder if path.is_dir() else path.parent, skip_bad).files
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


def working_size(run: Run, height: int, width: int) -> tuple[int, int]:
    """(h, w) the model sees: the TR training square, or for MLP the aspect-keeping patch-rounded size."""
    patch = run.derived.patch_size
    if run.structure == "TR":
        return run.derived.train_resolution, run.derived.train_resolution
    scale = run.derived.test_resolution / min(height, width)
    h, w = (max(patch, round(side * scale / patch) * patch) for side in (height, width))
    return h, w


def load_assignment(run: Run) -> np.ndarray:
    """Cluster -> class table (-1 = unmatched) from the test split's metrics.json of this run."""
    path = run.paths.results / "metrics.json"
    metrics = read_metrics(path)
    test_script = f"test_{run.structure.lower()}.py"
    if run.args.dataset == "directory" and not directory_has_labels(Path(run.args.data_dir)):
        raise UserError(f"--matched maps clusters to classes with the assignment {test_script} finds from labels, "
                        f"and {Path(run.args.data_dir).absolute()} has no label files: drop --matched (the "
                        f"outputs then hold cluster ids), or add labels/ to that folder and run {test_script}")
    if metrics is None:
        raise UserError(f"--matched needs the evaluation's {path.absolute()}: run {test_script} "
                        "with the same flags first")
    diffs = settings_mismatch(metrics.get("settings", {}), {**run.shared_settings(), **run.head_settings()})
    if diffs:
        raise UserError(f"{path} was made for another model ({'; '.join(diffs)})")
    check_report_of_trained(run, metrics, path)
    name = "unsupervised_crf" if run.args.crf else "unsupervised"
    table = metrics.get(name, {}).get("assignment")
    if table is None or len(table) != run.derived.n_classes:
        raise UserError(f"{path} holds no {name} assignment of {run.derived.n_classes} clusters; "
                        f"run test_{run.structure.lower()}.py again")
    return np.asarray(table, dtype=np.int64)


def resize_ids(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) integer map -> (H, W), nearest neighbour (pixel centres, as PIL does)."""
    t = torch.from_numpy(ids.astype(np.float32))[None, None]
    return F.interpolate(t, size, mode="nearest-exact")[0, 0].numpy().astype(np.int64)


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
