"""Own images as people see them: EXIF orientation applied, every PIL mode made 8-bit RGB or refused.

Named datasets keep the published reading (`loader.files.read_image`: `convert("RGB")` of the stored
pixels, since their labels follow the stored pixels); a user's photos, scans and 16-bit images go
through `displayed_rgb` (`segment_images.py`, `Segmenter.predict` on paths and PIL images, the
`directory` dataset).

Rules, per PIL mode:
- 1, L, P, RGB, RGBX, CMYK, YCbCr, HSV: PIL's own conversion to RGB.
- Transparency (LA, PA, RGBA, or a P/L/RGB image with a transparent colour): laid over white, as a
  viewer on a white page shows it; the colour stored under a fully transparent pixel is not used.
- 16-bit (I;16, I;16L, I;16B, I;16N) and 32-bit integer (I) images with values in 0..65535: `v >> 8`,
  the high byte. A fixed rule keeps one brightness for one value in every image (a stretch to each
  image's own range would not), and maps a x257 copy of an 8-bit image back to it exactly. Data that
  use fewer bits (12-bit sensors) look dark: stretch them before, if that is what you want.
  I images with values outside 0..65535 are refused.
- F (32-bit float) with finite values in [0, 1]: `round(v * 255)`; other values are refused.
- Anything else (LAB, I;16S, premultiplied La / RGBa, ...) is refused in one line naming the mode.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from utils.errors import UserError

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA = ("LA", "PA", "RGBA")
PLAIN = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
READ_MODES = PLAIN + ALPHA + SIXTEEN_BIT + ("I", "F")
BACKGROUND = (255, 255, 255)  # under transparent pixels


def displayed_rgb(image: Image.Image, what: str) -> Image.Image:
    """8-bit RGB `image` as a viewer displays it (see the module's rules); `what` names it in the refusal."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in SIXTEEN_BIT or mode == "I":
        return _gray_to_rgb(_high_byte(np.asarray(image), what, mode))
    if mode == "F":
        return _gray_to_rgb(_unit_float(np.asarray(image), what))
    if mode in ALPHA or (mode in PLAIN and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    if mode in PLAIN:
        return image.convert("RGB")
    raise UserError(f"{what} has PIL mode {mode}, which is not read: expected one of {', '.join(READ_MODES)} "
                    f"(save it as 8- or 16-bit RGB or grayscale)")


def _high_byte(pixels: np.ndarray, what: str, mode: str) -> np.ndarray:
    """(H, W) 16-bit values -> uint8 `v >> 8`; UserError for values outside 0..65535 (mode I)."""
    values = pixels.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UserError(f"{what} is a {mode} image with values in [{values.min()}, {values.max()}]: expected "
                        f"0..65535 (16 bits); save it as 8- or 16-bit")
    return (values >> 8).astype(np.uint8)


def _unit_float(pixels: np.ndarray, what: str) -> np.ndarray:
    """(H, W) float values in [0, 1] -> uint8 round(v * 255); UserError for other values."""
    if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
        raise UserError(f"{what} is a float (F) image with values in [{np.nanmin(pixels):.4g}, "
                        f"{np.nanmax(pixels):.4g}]: expected finite values in [0, 1]; scale it, or save it "
                        f"as 8- or 16-bit")
    return np.round(pixels.astype(np.float64) * 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(gray).convert("RGB")
