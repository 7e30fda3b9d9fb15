"""Pre-cropped training sets (what crop_dataset.py writes and training reads).

Geometry as STEGO / CAUSE: crop size = (int(H * ratio), int(W * ratio)); `five` = torchvision
five_crop (corners then center), `double` / `super` = ten_crop (five_crop of the image, then of
its mirror) at each ratio in turn. Crop k of source image i is file number i * per_image + k:

    data_dir/<layout.crops>_<type>_crop_<ratio>/img/train/<n>.jpg     (JPEG, PIL default quality)
    data_dir/<layout.crops>_<type>_crop_<ratio>/label/train/<n>.png   (class id + 1; 0 = ignore)

e.g. cocostuff/cropped/cocostuff_five_crop_0.5, cocostuff/cropped/coco81_double_crop_0,
pascalvoc/cropped/pascalvoc_super_crop_0. STEGO's data_dir/cropped/<dataset>_five_crop_0.5 is
read too. Each file is written atomically; a `.incomplete` marker lives in the set's folder
while crop_dataset.py runs, and readers refuse a set that still has it.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from loader.files import FileList, NumberedFiles, read_pair, require_dir
from loader.layouts import dataset_root, layout
from loader.workers import worker_loader
from utils.errors import UserError
from utils.io import atomic_write, ensure_writable_dir

INCOMPLETE = ".incomplete"


@dataclass(frozen=True)
class CropType:
    ratios: tuple[float, ...]
    mirrored: bool      # ten_crop (adds the five crops of the mirrored image) instead of five_crop
    folder_ratio: str   # the ratio as the published folder names spell it

    @property
    def per_image(self) -> int:
        return len(self.ratios) * (10 if self.mirrored else 5)


CROP_TYPES = {
    "five": CropType((0.5,), mirrored=False, folder_ratio="0.5"),
    "double": CropType((0.5, 0.8), mirrored=True, folder_ratio="0"),
    "super": CropType((0.3, 0.4, 0.5, 0.6, 0.7), mirrored=True, folder_ratio="0"),
}


def crop_type(name: str) -> CropType:
    if name not in CROP_TYPES:
        raise UserError(f"unknown crop type {name!r}; expected one of {', '.join(CROP_TYPES)}")
    return CROP_TYPES[name]


def crops(im: Image.Image, kind: CropType) -> list[Image.Image]:
    """All crops of one image (or label image), in file order."""
    width, height = im.size
    out: list[Image.Image] = []
    for ratio in kind.ratios:
        size = [int(height * ratio), int(width * ratio)]
        out += TF.ten_crop(im, size) if kind.mirrored else TF.five_crop(im, size)
    return out


def crop_command(dataset: str, kind: str, data_dir: Path) -> str:
    """The shell command that writes the set (quoted: paths may hold spaces)."""
    return shlex.join(["python", "crop_dataset.py", "--dataset", dataset, "--crop_type", kind,
                       "--data_dir", str(data_dir)])


def cropped_dirs(dataset: str, data_dir: Path, kind: str) -> list[Path]:
    """Where the set may live: the CAUSE path (written by us) first, then STEGO's."""
    stem = layout(dataset).crops
    if stem is None:
        raise UserError(f"the {dataset} dataset has no pre-cropped training sets; leave crop_type unset")
    suffix = f"_{kind}_crop_{crop_type(kind).folder_ratio}"
    return [Path(data_dir) / f"{stem}{suffix}", Path(data_dir) / "cropped" / f"{dataset}{suffix}"]


def cropped_files(dataset: str, data_dir: Path, kind: str) -> FileList:
    """The numbered crop files of a complete pre-cropped training set."""
    candidates = cropped_dirs(dataset, data_dir, kind)
    root = next((c for c in candidates if c.is_dir()), None)
    hint = crop_command(dataset, kind, data_dir)
    if root is None:
        raise UserError(f"pre-cropped training set not found: expected {candidates[0]}; run `{hint}`")
    if (root / INCOMPLETE).exists():
        raise UserError(f"pre-cropped set {root} is incomplete (cropping was interrupted); run `{hint}`")
    img_dir, label_dir = root / "img" / "train", root / "label" / "train"
    n_img, n_label = count_numbered(img_dir, ".jpg", hint), count_numbered(label_dir, ".png", hint)
    if n_img != n_label:
        raise UserError(f"{img_dir} holds {n_img} crops but {label_dir} holds {n_label}; run `{hint}`")
    return FileList(NumberedFiles(img_dir, ".jpg", n_img), NumberedFiles(label_dir, ".png", n_img))


def count_numbered(folder: Path, suffix: str, hint: str) -> int:
    """n when `folder` holds exactly 0<suffix> .. (n-1)<suffix> (other names ignored)."""
    require_dir(folder, "pre-cropped files")
    numbers = {int(name[:-len(suffix)]) for name in os.listdir(folder)
               if name.endswith(suffix) and name[:-len(suffix)].isdigit()}
    if not numbers or max(numbers) != len(numbers) - 1:
        raise UserError(f"{folder} does not hold files 0{suffix} .. n{suffix} without gaps; run `{hint}`")
    return len(numbers)


class _CropWriter(Dataset):
    """Item i writes the missing crops of source image i; returns (crops written, error or None)."""

    def __init__(self, files: FileList, label_map: np.ndarray, kind: CropType, img_dir: Path, label_dir: Path):
        self.files, self.label_map, self.kind = files, label_map, kind
        self.img_dir, self.label_dir = img_dir, label_dir

    def __len__(self) -> int:
        return len(self.files.images)

    def __getitem__(self, i: int) -> tuple[int, str | None]:
        first = i * self.kind.per_image
        targets = [(self.img_dir / f"{n}.jpg", self.label_dir / f"{n}.png")
                   for n in range(first, first + self.kind.per_image)]
        todo = [not (img.exists() and label.exists()) for img, label in targets]
        if not any(todo):
            return 0, None
        try:
            image, label = self._source(i)
        except UserError as e:
            return 0, str(e)
        for (img_path, label_path), img, lab, needed in zip(targets, crops(image, self.kind),
                                                            crops(label, self.kind), todo):
            if needed:
                atomic_write(label_path, lambda tmp: lab.save(tmp, format="PNG"))  # noqa: B023  (called at once)
                atomic_write(img_path, lambda tmp: img.save(tmp, format="JPEG"))  # noqa: B023  (called at once)
        return sum(todo), None

    def _source(self, i: int) -> tuple[Image.Image, Image.Image]:
        """Source image and its label as stored in crops: class id + 1, mode L."""
        image, raw = read_pair(self.files.images[i], self.files.labels[i])
        stored = (self.label_map[np.asarray(raw)] + 1).astype(np.uint8)  # (H, W)
        return image, Image.fromarray(stored, mode="L")


def write_cropped_set(dataset: str, data_dir: Path, kind: str, num_workers: int = 0,
                      progress: bool = True) -> tuple[Path, int]:
    """Write (or finish) the pre-cropped training set of `dataset`; returns (its folder, crops written).

    Re-runnable: crops already on disk are kept, missing ones are written, nothing is duplicated.
    """
    spec, lay = crop_type(kind), layout(dataset)
    out = cropped_dirs(dataset, data_dir, kind)[0]
    files = lay.list_files(dataset_root(dataset, data_dir), "train")
    img_dir, label_dir = out / "img" / "train", out / "label" / "train"
    for folder in (img_dir, label_dir):
        ensure_writable_dir(folder)
        for stale in folder.glob(".*.tmp"):  # temp files of an interrupted run
            stale.unlink()
    (out / INCOMPLETE).touch()
    writer = _CropWriter(files, lay.label_map, spec, img_dir, label_dir)
    loader = worker_loader(writer, num_workers, batch_size=None, shuffle=False)
    written = 0
    for count, error in tqdm(loader, total=len(writer), desc=f"cropping {dataset} ({kind})", unit="img",
                             disable=not progress):
        if error is not None:
            raise UserError(error)
        written += count
    expected = len(writer) * spec.per_image
    hint = crop_command(dataset, kind, data_dir)
    found = (count_numbered(img_dir, ".jpg", hint), count_numbered(label_dir, ".png", hint))
    if found != (expected, expected):
        raise UserError(f"{out} holds {found[0]} images and {found[1]} labels but the {len(writer)} source images "
                        f"give {expected} crops; remove {out} and run `{hint}` again")
    (out / INCOMPLETE).unlink()
    return out, written
