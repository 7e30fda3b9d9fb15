"""The built-in toy dataset: small synthetic scenes on which unsupervised segmentation is learnable.

Four classes that differ in colour (pairwise opposed after ImageNet normalisation, see
`_BASE_RGB`) and, weakly, in texture: sky (light, vertical gradient), grass (green, vertical
grain), water (blue, horizontal stripes), object (red, checker or dots). A scene stacks 2-3
stuff bands in random order with wavy boundaries at random heights, then 0-3 objects
(ellipses or polygons). Every class colour is jittered per image and channel. Written once,
deterministically from a seed, to data_dir/toy as PNG images, PNG label masks and list files
(see `toy_files`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from loader.datasets_table import TOY_CLASSES
from loader.files import FileList, listed_files
from loader.transforms import IMAGENET_MEAN, IMAGENET_STD
from utils.errors import UserError
from utils.io import current_umask

SKY, GRASS, WATER, OBJECT = range(len(TOY_CLASSES))
TOY_SIZE = 160
TOY_COUNTS = {"train": 240, "val": 48}
TOY_SEED = 0

# Base colours (RGB in [0, 1]): the ImageNet mean plus one std times the corners (1, 1, 1),
# (-1, 1, -1), (-1, -1, 1), (1, -1, -1) of a regular tetrahedron, so that after normalisation any
# two classes have cosine -1/3: four directions as far apart as they can be.
_CORNERS = {SKY: (1, 1, 1), GRASS: (-1, 1, -1), WATER: (-1, -1, 1), OBJECT: (1, -1, -1)}
_BASE_RGB = {cls: tuple(np.array(IMAGENET_MEAN) + np.array(IMAGENET_STD) * c) for cls, c in _CORNERS.items()}
COLOUR_JITTER = 0.06   # per image and channel, uniform +-
TEXTURE_AMPLITUDE = 0.08


def toy_files(root: Path, split: str) -> FileList:
    """root/{split}.txt lists ids; images/{split}/<id>.png, labels/{split}/<id>.png (class ids 0..3)."""
    return listed_files(root, f"{split}.txt", f"images/{split}/{{}}.png", f"labels/{split}/{{}}.png")


def ensure_toy(data_dir: Path, seed: int = TOY_SEED) -> Path:
    """data_dir/toy, generated on first use into a temporary folder that is then renamed into place.

    An interrupted generation leaves no half set; concurrent callers (e.g. several ranks) each
    write their own copy and the first rename wins.
    """
    root = Path(data_dir) / "toy"
    if root.is_dir():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".toy-", dir=root.parent))
    except OSError as e:
        raise UserError(f"cannot create the toy dataset under {root.parent}: {e.strerror}") from None
    try:
        write_toy(tmp, seed)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private
        os.rename(tmp, root)
    except OSError as e:
        if not root.is_dir():  # else another process renamed its copy first
            raise UserError(f"cannot write the toy dataset to {root}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_toy(root: Path, seed: int = TOY_SEED) -> None:
    """Write every split of the toy set under `root` (an existing folder)."""
    for split_index, (split, count) in enumerate(TOY_COUNTS.items()):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        ids = [f"{i:04d}" for i in range(count)]
        for i, name in enumerate(ids):
            img, label = render_scene(np.random.default_rng([seed, split_index, i]))
            Image.fromarray(img).save(root / "images" / split / f"{name}.png", compress_level=1)
            Image.fromarray(label).save(root / "labels" / split / f"{name}.png", compress_level=1)
        (root / f"{split}.txt").write_text("".join(f"{name}\n" for name in ids))


def render_scene(rng: np.random.Generator, size: int = TOY_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image uint8 (size, size, 3) and label uint8 (size, size) with class ids."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    label = _stuff_bands(rng, yy, xx)
    for _ in range(rng.choice(4, p=[0.15, 0.35, 0.3, 0.2])):
        label[_object_mask(rng, size)] = OBJECT
    img = np.zeros((size, size, 3))
    for cls in np.unique(label):
        where = label == cls
        img[where] = _texture(int(cls), rng, yy, xx)[where]
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), label


def _stuff_bands(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """2-3 horizontal bands of distinct stuff classes, random order, wavy boundaries: (S, S) uint8."""
    size = yy.shape[0]
    n_bands = int(rng.integers(2, 4))
    classes = rng.permutation([SKY, GRASS, WATER])[:n_bands].astype(np.uint8)
    band = np.zeros(yy.shape, dtype=np.int64)
    for height in np.sort(rng.uniform(0.12, 0.88, n_bands - 1)) * size:
        amplitude, period, phase = rng.uniform(0, 8), rng.uniform(40, 160), rng.uniform(0, 2 * np.pi)
        band += yy > height + amplitude * np.sin(2 * np.pi * xx / period + phase)
    return classes[band]


def _object_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random ellipse or polygon: bool (S, S)."""
    cx, cy = rng.uniform(15, size - 15, 2)
    radius = rng.uniform(16, 36)
    if rng.random() < 0.5:
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
        radii = radius * rng.uniform(0.6, 1.0, len(angles))
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).polygon(
            [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)], fill=1)
        return np.asarray(canvas, dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size]
    tilt = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(tilt) + (yy - cy) * np.sin(tilt)
    v = -(xx - cx) * np.sin(tilt) + (yy - cy) * np.cos(tilt)
    return (u / radius) ** 2 + (v / (radius * rng.uniform(0.5, 1.2))) ** 2 <= 1


def _texture(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Full-frame texture of one class with this image's colour jitter: float (S, S, 3) in ~[0, 1].

    The class colour plus a weak zero-mean pattern of the class (gradient, grain, stripes,
    checker or dots), scaled by `TEXTURE_AMPLITUDE`.
    """
    colour = np.array(_BASE_RGB[cls]) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3)
    size = yy.shape[0]
    noise = rng.standard_normal(yy.shape)
    if cls == SKY:
        pattern = 0.5 - yy / size + 0.1 * noise
    elif cls == GRASS:
        pattern = (noise + np.roll(noise, 1, 0) + np.roll(noise, 2, 0)) / np.sqrt(3)
    elif cls == WATER:
        pattern = np.sin(2 * np.pi * yy / rng.uniform(5, 9) + rng.uniform(0, 2 * np.pi)) + 0.1 * noise
    else:
        cell = int(rng.integers(3, 6))
        if rng.random() < 0.5:
            pattern = (xx // cell + yy // cell) % 2 - 0.5
        else:
            pattern = ((xx % (2 * cell) - cell) ** 2 + (yy % (2 * cell) - cell) ** 2 < (0.6 * cell) ** 2) - 0.5
    return colour + TEXTURE_AMPLITUDE * pattern[..., None]
