"""Datasets: `get_dataset(name, data_dir, split, resolution, ...)`.

Every dataset is the same `SegmentationDataset` over a list of files plus a label lookup table;
where the files live is described per dataset in loader/layouts.py, pre-cropped training sets
in loader/cropping.py, the generated toy set in loader/toy.py.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from loader import labelmaps
from loader.cropping import cropped_files
from loader.datasets_table import DATASETS
from loader.checks import CheckedFiles, check_files
from loader.files import FileList, read_image, read_pair
from loader.layouts import SPLITS, dataset_root, label_count_note, layout
from loader.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, fit, to_normalized_tensor
from utils.errors import UserError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SegmentationDataset", "denormalize", "get_dataset"]


class SegmentationDataset(Dataset):
    """Items {"ind": int, "img": (3, R, R) float normalised, "label": (R, R) long, -1 = ignore}.

    Without label files (`has_labels` False), or for an image without one, every label pixel is -1.
    `own_images`: images read as displayed (a user's folder), else as the published code reads them.
    """

    def __init__(self, files: FileList, label_map: np.ndarray, resolution: int, n_classes: int,
                 square_resize: bool = False, own_images: bool = False):
        self.files, self.label_map = files, label_map  # label_map: (256,) raw pixel -> class id
        self.resolution, self.n_classes, self.square_resize = resolution, n_classes, square_resize
        self.own_images = own_images

    @property
    def has_labels(self) -> bool:
        return self.files.labelled > 0

    def image_path(self, i: int) -> Path:
        return Path(self.files.images[i])

    def __len__(self) -> int:
        return len(self.files.images)

    def __getitem__(self, ind: int) -> dict:
        label_path = self.files.labels[ind] if self.files.labels is not None else None
        if label_path is None:
            image = read_image(self.image_path(ind), self.own_images)
            label = torch.full((self.resolution, self.resolution), labelmaps.IGNORE, dtype=torch.long)
        else:
            image, raw = read_pair(self.image_path(ind), label_path, self.own_images)
            pixels = np.asarray(fit(raw, self.resolution, self.square_resize))  # (R, R) uint8
            label = torch.from_numpy(self.label_map[pixels])                    # (R, R) long
        img = to_normalized_tensor(fit(image, self.resolution, self.square_resize))  # (3, R, R)
        return {"ind": ind, "img": img, "label": label}


def get_dataset(name: str, data_dir: str | Path, split: str, resolution: int, crop_type: str | None = None,
                labels: bool = True, n_classes: int | None = None, skip_bad_images: bool = False,
                min_side: int = 1) -> SegmentationDataset:
    """The `split` ("train" / "val") of dataset `name` under `data_dir`, resized to `resolution`.

    crop_type ("five", "double", "super"): read the pre-cropped training set that
    crop_dataset.py writes instead of the full images (train split only).
    labels=False: skip reading label files (labels are all -1).
    toy: generated under data_dir/toy on first use.
    directory (other datasets: with skip_bad_images): every image and label is decoded first
    (`loader.checks.check_files`, cached); an unusable pair (or an image with a side under `min_side`
    pixels) stops the run, or with skip_bad_images is left out. n_classes: the directory dataset's
    class count (`directory_classes`).
    """
    lay = layout(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not isinstance(resolution, int) or resolution < 1:
        raise UserError(f"resolution must be a positive integer, got {resolution!r}")
    n_classes = _class_count(name, n_classes)
    data_dir = Path(data_dir)
    if crop_type is None:
        root = dataset_root(name, data_dir)
        files = lay.list_files(root, split)
    else:
        if split != "train":
            raise UserError(f"pre-cropped sets exist for the train split only; asked for {split!r}")
        root, files = data_dir, cropped_files(name, data_dir, crop_type)
    if name == "directory" or skip_bad_images:
        checked = check_files(files, root, skip_bad_images, min_side, own=lay.own_images and crop_type is None)
        files = checked.files
        if name == "directory" and crop_type is None:
            n_classes, class_note = directory_classes(checked, n_classes)
            files = label_count_note(files, root)
            files = replace(files, notes=files.notes + (class_note,) + _upscaled_note(checked.sizes, resolution))
    if crop_type is not None:
        label_map = labelmaps.CROPPED
    else:
        label_map = lay.label_map if lay.label_map is not None else labelmaps.id_range(0, min(n_classes, 255))
    if not labels:
        files = replace(files, labels=None)
    return SegmentationDataset(files, label_map, resolution, n_classes or DATASETS[name].n_classes, lay.square_resize,
                               own_images=lay.own_images and crop_type is None)


def directory_classes(checked: CheckedFiles, n_classes: int | None) -> tuple[int, str]:
    """Class count of a directory dataset and a line saying where it comes from.

    Labelled: the largest class id in the labels + 1 (255 = ignore), or `n_classes` when it covers
    every id (a larger id stops the run naming its label file). Unlabelled: `n_classes`, or the default."""
    default = DATASETS["directory"].n_classes
    if checked.largest_label is None:
        if n_classes is None:
            return default, (f"classes: no labels, so {default} clusters (the default); pass --n_classes "
                             f"to choose how many")
        return n_classes, f"classes: no labels; {n_classes} clusters (--n_classes)"
    top, label = checked.largest_label
    if n_classes is None:
        return top + 1, (f"classes: {top + 1} (ids 0..{top} found in the labels; 255 = ignore); pass "
                         f"--n_classes to set more")
    if top >= n_classes:
        raise UserError(f"label {Path(label).absolute()} holds class id {top}, but --n_classes {n_classes} "
                        f"allows ids 0..{n_classes - 1} (255 = ignore): pass --n_classes {top + 1} or more, "
                        f"or leave it out to count the classes from the labels")
    return n_classes, f"classes: {n_classes} (--n_classes; the labels hold ids 0..{top}, 255 = ignore)"


def _upscaled_note(sizes: list[tuple[int, int]], resolution: int) -> tuple[str, ...]:
    small = sum(min(size) < resolution for size in sizes)
    if not small:
        return ()
    return (f"{small} of {len(sizes)} images have a side under {resolution} px and are enlarged to it",)


def _class_count(name: str, n_classes: int | None) -> int | None:
    """`n_classes` of the directory dataset (None: from its files), else the dataset's own count."""
    default = DATASETS[name].n_classes
    if name == "directory":
        if n_classes is not None and n_classes < 1:
            raise UserError(f"n_classes must be positive, got {n_classes}")
        return n_classes
    if n_classes is not None and n_classes != default:
        raise UserError(f"{name} has {default} classes; n_classes={n_classes} applies to the directory dataset only")
    return default

