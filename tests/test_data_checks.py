"""A user's folder is decoded in full before training (cached), its class count comes from its labels,
unusable files are left out only on request and recorded, and segment_images finds images like the dataset."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import loader.checks
from loader.dataloader import get_dataset
from stages.inference import list_inputs
from utils.config import dataset_folder
from utils.errors import UserError
from tests.conftest import TOY_CKPT, TOY_K
from tests.test_datasets import make_pascal, probe_label
from tests.test_reliability import Interrupted, interrupt_at
from tests.test_usability import N_CLASSES, RES, dir_flags, own_folder, stage

RUN = Path(__file__).resolve().parents[1] / "run"
MEDIATOR = ("mediator", None, "stages.mediator:train_mediator")


def truncated_jpeg(path: Path, side: int = RES) -> Path:
    """A JPEG cut in half: its header (what Pillow's verify reads) is whole, its pixel data is not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(1).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def labelled_pair(root: Path, name: str, label: np.ndarray, side: int = 8) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(root / "images" / f"{name}.png")
    Image.fromarray(label).save(root / "labels" / f"{name}.png")


def test_a_truncated_jpeg_is_found_before_training_or_left_out_and_recorded(tmp_path):
    root = own_folder(tmp_path, corrupt=False)
    cut = truncated_jpeg(root / "images" / "cut.jpg")
    with pytest.raises(UserError) as e:
        get_dataset("directory", root, "train", RES)
    assert str(e.value).startswith(f"unreadable image {cut} (OSError: image file is truncated")
    assert str(e.value).endswith("pass --skip_bad_images true to leave out unreadable files")
    ds = get_dataset("directory", root, "train", RES, skip_bad_images=True)
    assert len(ds) == 5 and cut not in ds.files.images and ds.files.excluded == (cut,)
    for i in range(len(ds)):  # every image left in decodes
        assert ds[i]["img"].shape == (3, RES, RES)


def test_a_named_dataset_is_checked_and_its_bad_files_left_out_with_the_flag(tmp_path):
    voc = make_pascal(tmp_path, "val", {"a": probe_label([1]), "b": probe_label([2])})
    cut = truncated_jpeg(voc / "JPEGImages" / "b.jpg", side=8)
    ds = get_dataset("pascalvoc", tmp_path, "val", 8, skip_bad_images=True)
    assert list(ds.files.images) == [voc / "JPEGImages" / "a.jpg"] and ds.files.excluded == (cut,)
    assert len(get_dataset("pascalvoc", tmp_path, "val", 8)) == 2  # not checked by default


@pytest.mark.parametrize("label,problem", [
    (np.zeros((8, 8), np.uint16) + 300, "has PIL mode I;16"),     # a 16-bit label
    (np.zeros((8, 6), np.uint8), "is 6x8 but image"),              # a label of another size
])
def test_a_16_bit_or_wrong_size_label_is_found_before_training(tmp_path, label, problem):
    labelled_pair(tmp_path, "good", np.zeros((8, 8), np.uint8))
    labelled_pair(tmp_path, "bad", label)
    with pytest.raises(UserError, match=problem) as e:
        get_dataset("directory", tmp_path, "train", 8)
    assert f"label {tmp_path / 'labels' / 'bad.png'}" in str(e.value)
    assert len(get_dataset("directory", tmp_path, "train", 8, skip_bad_images=True)) == 1


def test_an_image_smaller_than_one_patch_is_refused_and_enlarged_ones_are_counted(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((12, 5, 3), np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(UserError, match=f"image {tmp_path / 'tiny.png'} is 5x12, smaller than one 8x8 patch"):
        get_dataset("directory", tmp_path, "train", 16, min_side=8)
    assert "1 of 2 images have a side under 16 px and are enlarged to it" in \
        get_dataset("directory", tmp_path, "train", 16, min_side=4).files.notes


def test_the_decode_check_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    for k in range(3):
        labelled_pair(tmp_path, f"p{k}", np.full((8, 8), k, np.uint8))
    assert get_dataset("directory", tmp_path, "train", 8).n_classes == 3
    decoded: list[Path] = []
    original = loader.checks.decode_pair
    monkeypatch.setattr(loader.checks, "decode_pair", lambda image, label, own: decoded.append(image) or original(image, label, own))
    assert get_dataset("directory", tmp_path, "train", 8).n_classes == 3
    assert decoded == []  # the second check read the cache
    label = tmp_path / "labels" / "p0.png"
    Image.fromarray(np.full((8, 8), 5, np.uint8)).save(label)  # same size, new content and time
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    assert get_dataset("directory", tmp_path, "train", 8).n_classes == 6
    assert len(decoded) == 3


def test_segment_images_finds_images_like_the_directory_dataset(tmp_path):
    root = own_folder(tmp_path, corrupt=False)  # images/ and labels/ side by side
    pairs = list_inputs(root, tmp_path / "out")
    assert [p for p, _ in pairs] == list(get_dataset("directory", root, "val", RES).files.images)
    assert all(p.is_relative_to(root / "images") for p, _ in pairs)
    assert {name for _, name in pairs} == {str(p.relative_to(root / "images").with_suffix("")) for p, _ in pairs}


def test_bash_run_passes_n_classes_to_every_stage(tmp_path):
    shutil.copy(RUN, tmp_path / "run")
    log = tmp_path / "calls"
    fake = tmp_path / "python"  # stands in for the stage scripts: records their arguments (`-m` helpers run)
    fake.write_text(f'#!/bin/bash\nif [ "$1" = -m ]; then PYTHONPATH={RUN.parent} exec {sys.executable} "$@"; fi\n'
                    f'echo "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "dataset": "directory", "n_classes": "3"}
    out = subprocess.run(["bash", "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = [c for c in log.read_text().splitlines() if c.endswith(".py") or ".py " in c]  # the stage scripts
    assert len(calls) == 5 and all("--dataset directory" in c and "--n_classes 3" in c for c in calls)


def test_a_bad_file_stops_the_run_and_after_skipping_and_removing_it_the_run_resumes(toy_root, tmp_path, capsys,
                                                                                      monkeypatch):
    """Without the flag: one line naming the file and the flag, nothing written. With it: the run trains,
    prints each data line once; interrupted, the file removed, --resume continues and records the exclusion."""
    folder = own_folder(tmp_path / "mine", corrupt=False)
    cut = truncated_jpeg(folder / "images" / "cut.jpg")
    out = tmp_path / "o"
    flags = dir_flags(toy_root, folder, out, n_classes=None, max_steps=3, save_every=1)
    with pytest.raises(SystemExit) as e:
        stage(*MEDIATOR, flags)
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: unreadable image {cut} (OSError: image file is truncated")
    assert "--skip_bad_images true" in errors[0]
    assert not [p for p in out.rglob("*") if p.is_file()]

    interrupt_at(monkeypatch, 1)
    with pytest.raises(Interrupted):
        stage(*MEDIATOR, flags + ["--skip_bad_images", "true"])
    monkeypatch.undo()
    log = capsys.readouterr().out.splitlines()
    for line in (f"skipped unreadable image {cut}", "labels: 3 of 5 images have one",
                 "skipped 1 file(s) under", f"classes: {N_CLASSES} (ids 0..{N_CLASSES - 1} found in the labels"):
        assert len([x for x in log if x.startswith(line)]) == 1, line  # once per stage
    cut.unlink()
    stage(*MEDIATOR, flags + ["--resume"])
    own = dataset_folder(argparse.Namespace(dataset="directory", data_dir=folder))
    record = json.loads((out / "CAUSE" / own / "modularity" / TOY_CKPT / str(TOY_K) / "modular.json").read_text())
    assert record["excluded_images"] == ["images/cut.jpg"]
    assert record["settings"]["n_classes"] == N_CLASSES
