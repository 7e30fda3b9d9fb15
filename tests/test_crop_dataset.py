"""crop_dataset.py: crop geometry, folder names, re-runs, reading the sets back, errors."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import crop_dataset
from loader.cropping import INCOMPLETE, write_cropped_set
from loader.dataloader import get_dataset
from tests.test_datasets import make_cityscapes, make_coco, make_pascal
from utils.errors import UserError

H, W = 16, 20


def pattern(offset: int, modulo: int) -> np.ndarray:
    """Label ids (H, W) that tell every position apart within a crop: offset + (x + 3y) % modulo."""
    y, x = np.mgrid[0:H, 0:W]
    return (offset + (x + 3 * y) % modulo).astype(np.uint8)


def expected_crops(a: np.ndarray, ratios: tuple[float, ...], mirrored: bool) -> list[np.ndarray]:
    """Corners (tl, tr, bl, br) and center, then the same of the mirrored array, per ratio."""
    out = []
    for r in ratios:
        h, w = int(H * r), int(W * r)
        top, left = int(round((H - h) / 2)), int(round((W - w) / 2))
        for src in ([a, a[:, ::-1]] if mirrored else [a]):
            out += [src[:h, :w], src[:h, W - w:], src[H - h:, :w], src[H - h:, W - w:],
                    src[top:top + h, left:left + w]]
    return out


def stored_labels(folder: Path, count: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(folder / "label" / "train" / f"{n}.png")) for n in range(count)]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_five_crops_cityscapes(tmp_path):
    raw = [pattern(7, 27), pattern(0, 40)]  # label ids; ids 7..33 -> classes 0..26, others ignored
    make_cityscapes(tmp_path, "train", {("bonn", "bonn_000000"): raw[0], ("bonn", "bonn_000001"): raw[1]})
    out, _ = write_cropped_set("cityscapes", tmp_path, "five", progress=False)
    assert out == tmp_path / "cityscapes" / "cropped" / "cityscapes_five_crop_0.5"
    assert sorted(os.listdir(out / "img" / "train")) == sorted(f"{n}.jpg" for n in range(10))
    assert not (out / INCOMPLETE).exists()
    stored = stored_labels(out, 10)
    for i, ids in enumerate(raw):
        classes_plus_one = np.where((ids >= 7) & (ids <= 33), ids - 6, 0)
        for k, want in enumerate(expected_crops(classes_plus_one, (0.5,), False)):
            assert stored[5 * i + k].shape == (8, 10) and (stored[5 * i + k] == want).all(), (i, k)
    with Image.open(out / "img" / "train" / "1.jpg") as im:  # top-right crop: the green quadrant
        assert im.size == (10, 8)
        assert np.abs(np.asarray(im, dtype=int)[4, 5] - (30, 200, 30)).max() <= 12
    ds = get_dataset("cityscapes", tmp_path, "train", 8, crop_type="five")
    assert len(ds) == 10 and ds.n_classes == 27
    want = expected_crops(classes_plus_one, (0.5,), False)[4][:, 1:9].astype(int) - 1  # center-cropped to 8x8
    assert (ds[9]["label"].numpy() == want).all()


def test_double_crops_coco81(tmp_path):
    fine = np.full((H, W), 91, np.uint8)  # stuff -> class 0
    fine[:, :7] = 0                        # person -> class 1
    fine[-3:, :] = 255                     # unlabeled -> ignore
    make_coco(tmp_path, {"train2017": {"a": fine}}, {"train2017": {"Coco164kFull_Stuff_Coarse.txt": ["a"]}})
    out, _ = write_cropped_set("coco81", tmp_path, "double", progress=False)
    assert out == tmp_path / "cocostuff" / "cropped" / "coco81_double_crop_0"
    stored = stored_labels(out, 20)
    plus_one = np.select([fine == 0, fine == 91], [2, 1], 0)
    for k, want in enumerate(expected_crops(plus_one, (0.5, 0.8), True)):
        assert (stored[k] == want).all(), k
    assert [s.shape for s in stored[::5]] == [(8, 10), (8, 10), (12, 16), (12, 16)]
    assert len(os.listdir(out / "img" / "train")) == 20


def test_super_crops_pascal(tmp_path):
    make_pascal(tmp_path, "train", {"x": pattern(0, 21), "y": pattern(0, 23)})  # 21, 22 -> ignore
    out, _ = write_cropped_set("pascalvoc", tmp_path, "super", progress=False)
    assert out == tmp_path / "pascalvoc" / "cropped" / "pascalvoc_super_crop_0"
    stored = stored_labels(out, 100)
    for i, ids in enumerate([pattern(0, 21), pattern(0, 23)]):
        plus_one = np.where(ids <= 20, ids + 1, 0)
        for k, want in enumerate(expected_crops(plus_one, (0.3, 0.4, 0.5, 0.6, 0.7), True)):
            assert (stored[50 * i + k] == want).all(), (i, k)
    assert stored[44].shape == (11, 14)  # int(16 * 0.7), int(20 * 0.7); center top rounds 2.5 -> 2


def test_rerun_writes_nothing_and_restores_losses(tmp_path):
    make_cityscapes(tmp_path, "train", {("bonn", f"bonn_00000{i}"): pattern(7, 27) for i in range(3)})
    out, _ = write_cropped_set("cityscapes", tmp_path, "five", progress=False)
    before = snapshot(out)
    assert write_cropped_set("cityscapes", tmp_path, "five", progress=False) == (out, 0)
    assert snapshot(out) == before
    for name in ("img/train/3.jpg", "label/train/3.png", "img/train/14.jpg"):
        (out / name).unlink()
    (out / "img" / "train" / ".7.jpg.abc123.tmp").write_bytes(b"half a file")
    assert write_cropped_set("cityscapes", tmp_path, "five", num_workers=2, progress=False) == (out, 2)
    after = snapshot(out)
    assert after.keys() == before.keys()
    assert all(after[k][1] == before[k][1] for k in before)
    assert after["img/train/0.jpg"][0] == before["img/train/0.jpg"][0]  # untouched files not rewritten


def test_incomplete_or_gapped_sets_are_refused(tmp_path):
    make_cityscapes(tmp_path, "train", {("bonn", "bonn_000000"): pattern(7, 27)})
    out, _ = write_cropped_set("cityscapes", tmp_path, "five", progress=False)
    (out / INCOMPLETE).touch()
    with pytest.raises(UserError, match="incomplete.*crop_dataset.py --dataset cityscapes --crop_type five"):
        get_dataset("cityscapes", tmp_path, "train", 8, crop_type="five")
    (out / INCOMPLETE).unlink()
    (out / "img" / "train" / "2.jpg").unlink()
    with pytest.raises(UserError, match="without gaps"):
        get_dataset("cityscapes", tmp_path, "train", 8, crop_type="five")
    with pytest.raises(UserError, match="train split only"):
        get_dataset("cityscapes", tmp_path, "val", 8, crop_type="five")


def test_stego_folder_is_read(tmp_path):
    make_cityscapes(tmp_path, "train", {("bonn", "bonn_000000"): pattern(7, 27)})
    out, _ = write_cropped_set("cityscapes", tmp_path, "five", progress=False)
    (tmp_path / "cropped").mkdir()
    out.rename(tmp_path / "cropped" / "cityscapes_five_crop_0.5")
    ds = get_dataset("cityscapes", tmp_path, "train", 8, crop_type="five")
    assert len(ds) == 5 and ds.image_path(2) == tmp_path / "cropped" / "cityscapes_five_crop_0.5/img/train/2.jpg"


def test_script_errors_and_warning(tmp_path, capsys):
    assert crop_dataset.main(["--dataset", "cityscapes", "--data_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: cityscapes dataset folder not found: expected the folder")
    make_pascal(tmp_path, "train", {"x": pattern(0, 21)})
    voc = tmp_path / "pascalvoc" / "VOCdevkit" / "VOC2012"
    assert crop_dataset.main(["--dataset", "pascalvoc", "--crop_type", "five", "--data_dir", str(tmp_path),
                              "--num_workers", "0"]) == 0
    captured = capsys.readouterr()
    assert "warning: training on pascalvoc reads the 'super' set" in captured.err
    assert len(os.listdir(tmp_path / "pascalvoc" / "cropped" / "pascalvoc_five_crop_0.5" / "img" / "train")) == 5
    make_pascal(tmp_path, "train", {"x": pattern(0, 21), "broken": pattern(0, 21)})
    (voc / "JPEGImages" / "broken.jpg").write_bytes(b"\x00" * 10)
    assert crop_dataset.main(["--dataset", "pascalvoc", "--data_dir", str(tmp_path), "--num_workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot read image") and "broken.jpg" in err
    assert (tmp_path / "pascalvoc" / "cropped" / "pascalvoc_super_crop_0" / INCOMPLETE).exists()


def test_help_names_agree_with_the_cropping_code():
    """crop_dataset.py --help lists its choices from the torch-free table: the same as the cropping code's."""
    from loader.cropping import CROP_TYPES
    from loader.datasets_table import CROP_TYPE_NAMES, CROPPABLE
    from loader.layouts import LAYOUTS
    assert sorted(CROP_TYPE_NAMES) == sorted(CROP_TYPES)
    assert sorted(CROPPABLE) == sorted(name for name, lay in LAYOUTS.items() if lay.crops)
