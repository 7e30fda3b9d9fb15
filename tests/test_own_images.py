"""Own images read as people see them (loader/own_images.py): EXIF orientation, every PIL mode read or refused in
one line, transparency over white, 16-bit by its high byte; named datasets keep the stored pixels."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loader.dataloader import get_dataset
from loader.files import read_image
from utils.errors import UserError

ORIENTATION = 0x0112  # the EXIF tag phones write
RNG = np.random.default_rng(0)
# pixels (H, W) of a stored image -> as displayed, per EXIF orientation (the TIFF/EXIF specification's table)
DISPLAYED = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
             5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
             8: lambda a: np.rot90(a, 1)}


def save_oriented(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif)
    return path


def rgb(path: Path, own: bool = True) -> np.ndarray:
    return np.asarray(read_image(path, own)).astype(np.int64)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_own_images_are_read_as_displayed_and_named_datasets_as_stored(orientation, tmp_path):
    stored = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)  # (H, W, 3)
    path = save_oriented(tmp_path / "p.png", stored, orientation)
    np.testing.assert_array_equal(rgb(path), DISPLAYED[orientation](stored))
    np.testing.assert_array_equal(rgb(path, own=False), stored)  # the published reading


def test_a_phone_photo_in_a_directory_dataset_and_its_labels(tmp_path):
    """Orientation 6 (a phone held upright): stored 24x16, shown 16x24. A label drawn on the shown photo fits;
    one of the stored size gets one line naming it."""
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    stored = RNG.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    save_oriented(root / "images" / "p.jpg", stored, 6)
    shown = np.zeros((24, 16), np.uint8)  # (H, W) as displayed
    shown[:12] = 1
    Image.fromarray(shown).save(root / "labels" / "p.png")
    item = get_dataset("directory", root, "train", 16)[0]
    assert item["img"].shape == (3, 16, 16)  # the 16 px wide shown photo, center-cropped
    assert item["label"][:4].eq(1).all() and item["label"][-4:].eq(0).all()  # rows 4..19 of the shown label

    Image.fromarray(np.zeros((16, 24), np.uint8)).save(root / "labels" / "p.png")  # the stored size
    with pytest.raises(UserError) as e:
        get_dataset("directory", root, "train", 16)
    message = str(e.value)
    assert "\n" not in message and str((root / "labels" / "p.png").absolute()) in message
    assert re.search(r"is 24x16, the size of image .*p\.jpg as stored.*EXIF orientation to 16x24", message)


def gray_ramp(height: int = 6, width: int = 7) -> np.ndarray:
    return RNG.integers(0, 256, (height, width), dtype=np.uint8)


def over_white(value: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """value * a + 255 * (1 - a), a = alpha / 255: a colour seen through its transparency on a white page."""
    a = alpha.astype(np.float64) / 255
    return np.round(value * a + 255 * (1 - a)).astype(np.int64)


def case_1() -> tuple[Image.Image, np.ndarray]:
    bits = RNG.integers(0, 2, (5, 9)).astype(bool)
    return Image.fromarray(bits), np.where(bits, 255, 0)[..., None].repeat(3, -1)


def case_l() -> tuple[Image.Image, np.ndarray]:
    g = gray_ramp()
    return Image.fromarray(g), g[..., None].repeat(3, -1)


def case_la() -> tuple[Image.Image, np.ndarray]:
    g, a = gray_ramp(), gray_ramp()
    a[0, 0], a[0, 1] = 0, 255  # fully transparent and fully opaque
    return Image.fromarray(np.stack([g, a], -1), "LA"), over_white(g, a)[..., None].repeat(3, -1)


def case_p_transparent() -> tuple[Image.Image, np.ndarray]:
    index = RNG.integers(0, 3, (6, 7), dtype=np.uint8)
    palette = np.array([[10, 20, 30], [200, 0, 0], [0, 90, 250]], np.uint8)
    im = Image.fromarray(index, "P")
    im.putpalette(palette.flatten().tolist())
    im.info["transparency"] = 0  # index 0 is see-through: white
    expected = palette[index].astype(np.int64)
    expected[index == 0] = 255
    return im, expected


def case_rgba() -> tuple[Image.Image, np.ndarray]:
    colour, a = RNG.integers(0, 256, (6, 7, 3), dtype=np.uint8), gray_ramp()
    a[1, 1] = 0
    return Image.fromarray(np.dstack([colour, a]), "RGBA"), over_white(colour, a[..., None])


def case_cmyk() -> tuple[Image.Image, np.ndarray]:
    cmyk = RNG.integers(0, 256, (6, 7, 4), dtype=np.uint8)
    ink = cmyk.astype(np.float64) / 255
    expected = 255 * (1 - ink[..., :3]) * (1 - ink[..., 3:])  # subtractive: R = (1 - C)(1 - K)
    return Image.fromarray(cmyk, "CMYK"), np.round(expected).astype(np.int64)


def case_ycbcr() -> tuple[Image.Image, np.ndarray]:
    ycc = RNG.integers(16, 236, (6, 7, 3), dtype=np.uint8)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    expected = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                         y + 1.772 * (cb - 128)], -1)  # JPEG (JFIF) YCbCr -> RGB
    return Image.fromarray(ycc, "YCbCr"), np.clip(np.round(expected), 0, 255).astype(np.int64)


def sixteen_bit() -> tuple[np.ndarray, np.ndarray]:
    values = RNG.integers(0, 65536, (6, 7)).astype(np.uint16)
    values[0, :3] = (0, 255, 65535)
    return values, (values // 256)[..., None].repeat(3, -1).astype(np.int64)  # the high byte


def case_i16() -> tuple[Image.Image, np.ndarray]:
    values, expected = sixteen_bit()
    return Image.fromarray(values), expected


def case_i16b() -> tuple[Image.Image, np.ndarray]:
    values, expected = sixteen_bit()
    return Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes()), expected


def case_i() -> tuple[Image.Image, np.ndarray]:
    values, expected = sixteen_bit()
    return Image.fromarray(values.astype(np.int32)), expected


def case_f() -> tuple[Image.Image, np.ndarray]:
    values = RNG.random((6, 7)).astype(np.float32)
    values[0, :2] = (0.0, 1.0)
    return Image.fromarray(values), np.round(values.astype(np.float64) * 255)[..., None].repeat(3, -1)


MODES = {"1": case_1, "L": case_l, "LA": case_la, "P": case_p_transparent, "RGBA": case_rgba, "CMYK": case_cmyk,
         "YCbCr": case_ycbcr, "I;16": case_i16, "I;16B": case_i16b, "I": case_i, "F": case_f}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_pil_opens_is_read_as_displayed(mode, tmp_path):
    image, expected = MODES[mode]()
    assert image.mode == mode
    path = tmp_path / ("p.png" if mode == "P" else "p.tif")  # files that keep the mode (and P's transparency)
    image.save(path)
    with Image.open(path) as opened:
        assert opened.mode == mode
    got = rgb(path)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= (1 if mode in ("LA", "RGBA", "CMYK", "YCbCr") else 0)


@pytest.mark.parametrize("make,words", [
    (lambda: Image.fromarray(np.array([[0, 70000]], np.int32)), "I image with values in [0, 70000]: expected 0..65535"),
    (lambda: Image.fromarray(np.array([[-1, 5]], np.int32)), "I image with values in [-1, 5]"),
    (lambda: Image.fromarray(np.array([[0.5, 1.5]], np.float32)), "values in [0.5, 1.5]: expected finite values"),
    (lambda: Image.fromarray(np.array([[0.5, np.nan]], np.float32)), "expected finite values in [0, 1]"),
    (lambda: Image.new("LAB", (3, 2)), "has PIL mode LAB, which is not read: expected one of"),
])
def test_what_cannot_be_read_as_displayed_is_refused_in_one_line(make, words, tmp_path):
    path = tmp_path / "p.tif"
    make().save(path)
    with pytest.raises(UserError) as e:
        read_image(path, own=True)
    assert words in str(e.value) and str(path.absolute()) in str(e.value) and "\n" not in str(e.value)


def test_a_16_bit_copy_reads_as_its_8_bit_original(tmp_path):
    """x257 spreads 0..255 over 0..65535 (v * 257 = v << 8 | v): the high byte is the original again."""
    original = gray_ramp(32, 40)
    Image.fromarray(original).save(tmp_path / "8.png")
    Image.fromarray(original.astype(np.uint16) * 257).save(tmp_path / "16.png")
    with Image.open(tmp_path / "16.png") as im:
        assert im.mode == "I;16"
    np.testing.assert_array_equal(rgb(tmp_path / "16.png"), rgb(tmp_path / "8.png"))
