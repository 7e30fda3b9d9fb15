"""Where each dataset's files live under --data_dir (the STEGO / CAUSE layouts), as data.

    cocostuff27, coco81, coco171   data_dir/cocostuff/
        images/{train2017,val2017}/<id>.jpg, annotations/{train2017,val2017}/<id>.png (fine ids),
        curated/{train2017,val2017}/<list>.txt
        cocostuff27: train = Coco164kFull_Stuff_Coarse.txt, val = Coco164kFull_Stuff_Coarse_7.txt;
        coco81 / coco171: Coco164kFull_Stuff_Coarse.txt for both splits
    cityscapes                     data_dir/cityscapes/
        leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png,
        gtFine/{train,val}/<city>/<name>_gtFine_labelIds.png
    pascalvoc                      data_dir/pascalvoc/VOCdevkit/VOC2012/
        JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/{train,val}.txt
    potsdam                        data_dir/potsdam/  (STEGO's Potsdam-3: 200x200 tiles)
        imgs/<id>.mat ('img': RGB + infrared), gt/<id>.mat ('gt': ISPRS ids 0..5),
        labelled_train.txt (train), labelled_test.txt (val), unlabelled_train.txt (not read)
    potsdamraw                     data_dir/potsdamraw/processed/  (STEGO's PotsdamRaw: 200x200 blocks of
        38 source tiles, 15 x 15 blocks each, in spatial order)
        imgs/<tile>_<row>_<col>.mat, gt/<tile>_<row>_<col>.mat (a block without one is all-ignore, as in
        STEGO); no split lists: both splits read every block
    toy                            data_dir/toy/  (written by loader/toy.py on first use)
        images/{train,val}/<id>.png, labels/{train,val}/<id>.png, {train,val}.txt
    directory                      data_dir itself: see `directory_files`

Pre-cropped training sets: see loader/cropping.py.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from loader import labelmaps
from loader.files import FileList, FoundImages, find_images, listed_files, require_dir
from loader.toy import TOY_CLASSES, ensure_toy, toy_files
from utils.errors import UserError

SPLITS = ("train", "val")


@dataclass(frozen=True)
class Layout:
    folder: str                                  # dataset root, relative to data_dir
    list_files: Callable[[Path, str], FileList]  # (dataset root, split) -> files
    label_map: np.ndarray | None                 # (256,) raw pixel -> class id (None: ids < n_classes)
    square_resize: bool = False                  # Pascal VOC: resize to a square, no center crop
    crops: str | None = None                     # pre-cropped sets: data_dir/<crops>_<type>_crop_<ratio>
    own_images: bool = False                     # a user's images, read as displayed (loader/own_images.py)


def coco_files(root: Path, split: str, val_list: str) -> FileList:
    """COCO-Stuff: train reads the full curated list, val the list named by `val_list`."""
    year = f"{split}2017"
    list_name = "Coco164kFull_Stuff_Coarse.txt" if split == "train" else val_list
    return listed_files(root, f"curated/{year}/{list_name}", f"images/{year}/{{}}.jpg",
                        f"annotations/{year}/{{}}.png")


def cityscapes_files(root: Path, split: str) -> FileList:
    image_dir = require_dir(root / "leftImg8bit" / split, "Cityscapes images")
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise UserError(f"no <city>/*_leftImg8bit.png images found under {image_dir}")
    labels = [root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
              for p in images]
    return FileList(images, labels)


POTSDAM_LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt"}
POTSDAMRAW_NAME = re.compile(r"(\d+)_(\d+)_(\d+)\.mat")


def potsdamraw_files(root: Path, split: str) -> FileList:
    """Every `<tile>_<row>_<col>.mat` block under imgs/, in tile, row, column order (STEGO's order); `split` is
    ignored. A block without `gt/<name>.mat` is all-ignore (STEGO's `FileNotFoundError` branch): one note
    gives their count."""
    image_dir = require_dir(root / "imgs", "PotsdamRaw images")
    numbered = sorted((tuple(int(g) for g in m.groups()), name) for name in os.listdir(image_dir)
                      if (m := POTSDAMRAW_NAME.fullmatch(name)))
    if not numbered:
        raise UserError(f"no <tile>_<row>_<col>.mat images found under {image_dir}")
    names = [name for _, name in numbered]
    labels = [root / "gt" / n for n in names]
    labels = [p if p.is_file() else None for p in labels]
    unlabelled = sum(p is None for p in labels)
    notes = (f"PotsdamRaw: {unlabelled} of {len(names)} blocks have no label under {root / 'gt'}; they are "
             f"all-ignore, as STEGO reads them",) if unlabelled else ()
    return FileList([image_dir / n for n in names], labels, notes)


def directory_images(root: Path) -> tuple[Path, FoundImages]:
    """The images of a user's folder and the folder they lie in: `root/images/` when it exists (labels,
    if any, then lie in `root/labels/`), else `root` itself; every image found recursively, in every
    format Pillow opens. The directory dataset and segment_images.py both find images with it."""
    image_root, label_root = root / "images", root / "labels"
    if image_root.is_dir():
        return image_root, find_images(image_root)
    if label_root.is_dir():
        raise UserError(f"{label_root.absolute()} exists but {image_root.absolute()} does not: "
                        f"put the images there")
    return root, find_images(root)


def directory_files(root: Path, split: str) -> FileList:
    """A user's folder; `split` is ignored (train and val are both the whole folder).

    Images as `directory_images` finds them. With a `root/images/` folder, labels are optional in
    `root/labels/` at the same relative path with a .png suffix (raw class ids, 255 = ignore); images
    without a label file are unlabelled. Files that are not images are left out and listed in the notes.
    """
    image_root, found = directory_images(root)
    label_root = root / "labels"
    if image_root == root or not label_root.is_dir():
        return FileList(found.images, None, found.note(image_root))
    labels = [(label_root / p.relative_to(image_root)).with_suffix(".png") for p in found.images]
    labels = [p if p.is_file() else None for p in labels]
    if all(p is None for p in labels):
        return FileList(found.images, None, found.note(image_root) + (
            f"none of the {len(labels)} images has a label under {label_root.absolute()} (expected "
            f"labels/<path under images/ with a .png suffix>): training and evaluating without labels",))
    return FileList(found.images, labels, found.note(image_root))


def label_count_note(files: FileList, root: Path) -> FileList:
    """`files` of a partly or fully labelled `directory` dataset with a line saying how many have labels."""
    if files.labels is None:
        return files
    return replace(files, notes=files.notes + (
        f"labels: {files.labelled} of {len(files.images)} images have one under {(root / 'labels').absolute()}; "
        f"the linear probe and the metrics use those {files.labelled}",))


def directory_has_labels(root: Path) -> bool:
    """Whether a `directory` dataset folder has at least one label file."""
    label_root = Path(root) / "labels"
    return label_root.is_dir() and any(p.suffix.lower() == ".png" for p in label_root.rglob("*"))


def _coco(label_map: np.ndarray, crop_name: str, val_list: str) -> Layout:
    return Layout("cocostuff", lambda root, split: coco_files(root, split, val_list), label_map,
                  crops=f"cocostuff/cropped/{crop_name}")


LAYOUTS: dict[str, Layout] = {
    "cocostuff27": _coco(labelmaps.COCOSTUFF27, "cocostuff", "Coco164kFull_Stuff_Coarse_7.txt"),
    "coco81": _coco(labelmaps.COCO81, "coco81", "Coco164kFull_Stuff_Coarse.txt"),
    "coco171": _coco(labelmaps.COCO171, "coco171", "Coco164kFull_Stuff_Coarse.txt"),
    "cityscapes": Layout("cityscapes", cityscapes_files, labelmaps.CITYSCAPES, crops="cityscapes/cropped/cityscapes"),
    "pascalvoc": Layout(
        "pascalvoc/VOCdevkit/VOC2012",
        lambda root, split: listed_files(root, f"ImageSets/Segmentation/{split}.txt", "JPEGImages/{}.jpg",
                                         "SegmentationClass/{}.png"),
        labelmaps.PASCALVOC, square_resize=True, crops="pascalvoc/cropped/pascalvoc"),
    "potsdam": Layout(
        "potsdam", lambda root, split: listed_files(root, POTSDAM_LISTS[split], "imgs/{}.mat", "gt/{}.mat"),
        labelmaps.POTSDAM, crops="potsdam/cropped/potsdam"),
    "potsdamraw": Layout("potsdamraw/processed", potsdamraw_files, labelmaps.POTSDAM),
    "toy": Layout("toy", toy_files, labelmaps.id_range(0, len(TOY_CLASSES)), crops="toy/cropped/toy"),
    "directory": Layout(".", directory_files, None, own_images=True),
}


def layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise UserError(f"unknown dataset {name!r}; expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def dataset_root(name: str, data_dir: Path) -> Path:
    """The dataset's folder under data_dir (the toy set is generated on first use).

    UserError naming the folder (or data_dir) when it is missing.
    """
    if name == "toy":
        ensure_toy(data_dir)
    require_dir(Path(data_dir), "data directory")
    return require_dir(Path(data_dir) / layout(name).folder, f"{name} dataset folder",
                       "the expected layouts are listed in loader/layouts.py")
