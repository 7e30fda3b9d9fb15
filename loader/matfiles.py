"""MATLAB `.mat` tiles of the STEGO Potsdam sets: `img` (H, W, 4) RGB + infrared, `gt` (H, W) class ids."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import loadmat
from scipy.io.matlab import MatReadError

from utils.errors import UserError


def _variable(path: Path, key: str) -> np.ndarray:
    """The array stored under `key`; UserError naming the file when it is missing or unreadable."""
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    try:
        contents = loadmat(str(path))
    except (OSError, ValueError, NotImplementedError, MatReadError) as e:
        raise UserError(f"cannot read {path} as a MATLAB file ({type(e).__name__}: {e})") from None
    if key not in contents:
        found = ", ".join(k for k in contents if not k.startswith("__"))
        raise UserError(f"{path} holds no variable {key!r} (found: {found})")
    return np.asarray(contents[key])


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Pixel array -> uint8: integers are kept (they must lie in 0..255), floats in [0, 1] scaled by 255
    and truncated, as torchvision's `to_pil_image` does."""
    if np.issubdtype(values.dtype, np.floating):
        return (np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)
    if values.size and (values.min() < 0 or values.max() > 255):
        raise UserError(f"pixel values lie in [{values.min()}, {values.max()}]; expected 0..255")
    return values.astype(np.uint8)


def read_mat_image(path: Path) -> Image.Image:
    """RGB image from the `img` variable (H, W, C >= 3); the infrared fourth channel is dropped."""
    img = _variable(path, "img")
    if img.ndim != 3 or img.shape[2] < 3:
        raise UserError(f"{path}: 'img' has shape {img.shape}; expected (H, W, 3 or 4)")
    return Image.fromarray(to_uint8(img[:, :, :3]), mode="RGB")


def read_mat_label(path: Path) -> Image.Image:
    """Single-channel 8-bit label image from the `gt` variable (H, W) of raw class ids."""
    gt = _variable(path, "gt")
    if gt.ndim == 3 and gt.shape[2] == 1:
        gt = gt[:, :, 0]
    if gt.ndim != 2:
        raise UserError(f"{path}: 'gt' has shape {gt.shape}; expected (H, W)")
    return Image.fromarray(to_uint8(gt), mode="L")
