"""Image and label files on disk: lists of paths, reading with clear errors."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from loader.matfiles import read_mat_image, read_mat_label
from utils.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class FileList:
    """Paired image and label paths of one split; `labels` is None for unlabeled data."""
    images: Sequence[Path]
    labels: Sequence[Path] | None


class NumberedFiles(Sequence[Path]):
    """`folder/0<suffix>`, `folder/1<suffix>`, ... without holding a million paths in memory."""

    def __init__(self, folder: Path, suffix: str, count: int):
        self.folder, self.suffix, self.count = folder, suffix, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.count))]
        if not -self.count <= i < self.count:
            raise IndexError(i)
        return self.folder / f"{i % self.count}{self.suffix}"


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """`path` if it is a folder, else UserError naming it (and `hint`, when given)."""
    if not path.is_dir():
        raise UserError(f"{what} not found: expected the folder {path}" + (f" ({hint})" if hint else ""))
    return path


def read_list(path: Path) -> list[str]:
    """Non-empty stripped lines of a split list file."""
    if not path.is_file():
        raise UserError(f"list file not found: expected {path}")
    with open(path) as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise UserError(f"list file {path} is empty")
    return ids


def listed_files(root: Path, list_file: str, image: str, label: str) -> FileList:
    """Files named by the ids of a list file; `image` / `label` are patterns with one `{}` for the id."""
    ids = read_list(root / list_file)
    return FileList([root / image.format(i) for i in ids], [root / label.format(i) for i in ids])


def read_image(path: Path) -> Image.Image:
    """RGB image; UserError naming the file when it is missing or not an image."""
    if Path(path).suffix == ".mat":
        return read_mat_image(path)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable("image", path, e) from None


def read_label(path: Path) -> Image.Image:
    """Single-channel 8-bit label image (PIL mode L or P, pixel = class id)."""
    if Path(path).suffix == ".mat":
        return read_mat_label(path)
    try:
        with Image.open(path) as im:
            im.load()
            label = im.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable("label", path, e) from None
    if label.mode not in ("L", "P"):
        raise UserError(f"label {path} has PIL mode {label.mode}; expected a single-channel "
                        f"8-bit PNG (mode L or P) of class ids")
    return label


def read_pair(image_path: Path, label_path: Path) -> tuple[Image.Image, Image.Image]:
    """RGB image and its label image, which must have the same size."""
    image, label = read_image(image_path), read_label(label_path)
    if label.size != image.size:
        raise UserError(f"label {label_path} is {label.size[0]}x{label.size[1]} but image {image_path} "
                        f"is {image.size[0]}x{image.size[1]}")
    return image, label


def _unreadable(what: str, path: Path, e: Exception) -> UserError:
    if isinstance(e, FileNotFoundError):
        return UserError(f"{what} file not found: {path}")
    return UserError(f"cannot read {what} {path} ({type(e).__name__}: {e})")


def find_images(folder: Path) -> list[Path]:
    """All images (*.jpg, *.jpeg, *.png, any case) under `folder`, recursively, sorted."""
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise UserError(f"no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}) found under {folder}")
    return found
