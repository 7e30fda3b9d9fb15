"""Image and label files on disk: lists of paths, reading with clear errors."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

from loader.matfiles import read_mat_image, read_mat_label
from loader.own_images import displayed_rgb
from utils.errors import UserError

SHOWN_NAMES = 5  # file names listed in a message about many files


@dataclass(frozen=True)
class FileList:
    """Paired image and label paths of one split.

    `labels` is None for unlabeled data; an entry is None for an image without a label (partly
    labelled folders). `notes`: what the listing left out or found, for the run's log; `excluded`:
    images left out as unusable (--skip_bad_images), recorded with the run's results."""
    images: Sequence[Path]
    labels: Sequence[Path | None] | None
    notes: tuple[str, ...] = ()
    excluded: tuple[Path, ...] = ()

    @property
    def labelled(self) -> int:
        """How many images have a label file."""
        return 0 if self.labels is None else sum(p is not None for p in self.labels)


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
    """`path` if it is a folder, else UserError naming it as tried (absolute) and `hint`, when given."""
    if not path.is_dir():
        raise UserError(f"{what} not found: expected the folder {path.absolute()}" + (f" ({hint})" if hint else ""))
    return path


def read_list(path: Path) -> list[str]:
    """Non-empty stripped lines of a split list file."""
    if not path.is_file():
        raise UserError(f"list file not found: expected {path.absolute()}")
    with open(path) as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise UserError(f"list file {path} is empty")
    return ids


def listed_files(root: Path, list_file: str, image: str, label: str) -> FileList:
    """Files named by the ids of a list file; `image` / `label` are patterns with one `{}` for the id."""
    ids = read_list(root / list_file)
    return FileList([root / image.format(i) for i in ids], [root / label.format(i) for i in ids])


def read_image(path: Path, own: bool = False) -> Image.Image:
    """RGB image; UserError naming the file when it is missing or not an image (or, `own`, not read).

    `own` False: the published reading of named datasets, the stored pixels `convert("RGB")`ed. `own`
    True: a user's image as displayed (`loader.own_images.displayed_rgb`: EXIF orientation, modes, 16-bit)."""
    if Path(path).suffix == ".mat":
        return read_mat_image(path)
    try:
        with Image.open(path) as im:
            return displayed_rgb(im, f"image {Path(path).absolute()}") if own else im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _unreadable("image", path, e) from None


def stored_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as stored, before any EXIF orientation (reads the header only)."""
    with Image.open(path) as im:
        return im.size


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


def read_pair(image_path: Path, label_path: Path, own: bool = False) -> tuple[Image.Image, Image.Image]:
    """RGB image (read as `read_image` with `own` reads it) and its label image, which must have its size."""
    image, label = read_image(image_path, own), read_label(label_path)
    if label.size != image.size:
        raise UserError(pair_size_problem(image_path, label_path, image.size, label.size, own))
    return image, label


def pair_size_problem(image_path: Path, label_path: Path, image_size: tuple[int, int],
                      label_size: tuple[int, int], own: bool) -> str:
    """The line about a label whose (width, height) is not its image's; for an own image whose label has the
    size of the image as stored, it says that the image is read as its EXIF orientation displays it."""
    label, image = Path(label_path).absolute(), Path(image_path).absolute()
    if own and label_size == image_size[::-1] and stored_size(image_path) == label_size:
        return (f"label {label} is {label_size[0]}x{label_size[1]}, the size of image {image} as stored, but the "
                f"image is read as displayed, turned by its EXIF orientation to {image_size[0]}x{image_size[1]}: "
                f"turn the label the same way (or remove the orientation tag from the image)")
    return f"label {label} is {label_size[0]}x{label_size[1]} but image {image} is {image_size[0]}x{image_size[1]}"


def _unreadable(what: str, path: Path, e: Exception) -> UserError:
    if isinstance(e, FileNotFoundError):
        return UserError(f"{what} file not found: {Path(path).absolute()}")
    return UserError(f"cannot read {what} {Path(path).absolute()} ({type(e).__name__}: {e})")


@functools.cache
def image_suffixes() -> frozenset[str]:
    """Lower-case suffixes (".jpg", ".webp", ".tif", ...) of every format this Pillow can open (stubs,
    which need a handler installed, left out)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and not _is_stub(Image.OPEN[fmt][0]))


def _is_stub(factory: object) -> bool:
    return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in image_suffixes()


def name_list(paths: Sequence[Path], root: Path) -> str:
    """The first few of `paths`, relative to `root`, and how many more."""
    shown = ", ".join(str(p.relative_to(root)) for p in paths[:SHOWN_NAMES])
    return shown + (f", ... ({len(paths) - SHOWN_NAMES} more)" if len(paths) > SHOWN_NAMES else "")


@dataclass(frozen=True)
class FoundImages:
    images: list[Path]     # files with a suffix Pillow opens, sorted
    skipped: list[Path]    # every other file, sorted

    def note(self, folder: Path) -> tuple[str, ...]:
        """One line about the skipped files, if any, for the log."""
        if not self.skipped:
            return ()
        return (f"skipped {len(self.skipped)} file(s) under {folder.absolute()} that are not images Pillow "
                f"opens: {name_list(self.skipped, folder)}",)


def find_images(folder: Path) -> FoundImages:
    """Every file under `folder` (recursively) whose suffix is a format Pillow opens, and the others."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    found = FoundImages([p for p in files if is_image_name(p)], [p for p in files if not is_image_name(p)])
    if not found.images:
        raise UserError(f"no images found under {folder.absolute()} (looked for the formats Pillow opens: "
                        f"{', '.join(sorted(image_suffixes()))})")
    return found
