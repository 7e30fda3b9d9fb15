"""segment_images.py: maps at each image's own size, matched ids, working sizes, and input errors."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from loader.class_names import class_palette
from utils.visualize import cluster_palette
from modules.segment import Cluster, SegmentMLP
from stages.inference import main
from stages.segmenter import working_size
from tests.conftest import for_stage
from tests.toy_fixtures import C, D, K, P, R, artifact_dir, flags, save_published, train_toy
from utils.io import file_record


@pytest.fixture(scope="module")
def trained(toy_root: Path) -> Path:
    return train_toy(toy_root)


@pytest.fixture(scope="module")
def photos(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two toy scenes squeezed to non-square sizes, one in a sub-folder."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    sources = sorted((toy_root / "data" / "toy" / "images" / "val").glob("*.png"))
    Image.open(sources[0]).convert("RGB").resize((211, 97)).save(folder / "wide.png")
    Image.open(sources[1]).convert("RGB").resize((60, 150)).save(folder / "sub" / "tall.jpg")
    return folder


def segment(toy_root: Path, out: Path, *extra: str) -> None:
    main(for_stage("segment_images", flags(toy_root, out) + list(extra)))


def save_random_mlp(out: Path) -> None:
    """An MLP head and cluster file in the published layout (plain state dicts, no JSON) under `out`."""
    torch.manual_seed(0)
    save_published(SegmentMLP(D, R, P, C).state_dict(), artifact_dir(out) / "segment_mlp.pth")
    save_published(Cluster(D, R, K, C).state_dict(), artifact_dir(out) / "cluster_mlp.pth")


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


@pytest.mark.slow
def test_tr_maps_have_each_images_size_and_matched_ids_follow_the_assignment(trained, toy_root, photos, tmp_path):
    raw, matched = tmp_path / "raw", tmp_path / "matched"
    segment(toy_root, trained, "--input", str(photos), "--out", str(raw))
    for name, (w, h) in (("wide", (211, 97)), ("sub/tall", (60, 150))):
        labels = read(raw / f"{name}_labels.png")
        assert labels.shape == (h, w) and labels.dtype == np.uint8 and labels.max() < C
        colours = cluster_palette(C, class_palette("toy"))              # raw cluster ids: cluster colours
        np.testing.assert_array_equal(read(raw / f"{name}_seg.png"), colours[labels])
        overlay = read(raw / f"{name}_overlay.png").astype(int)
        image = np.asarray(Image.open(photos / (name + (".png" if name == "wide" else ".jpg"))).convert("RGB"))
        assert np.abs(overlay - (image.astype(int) + colours[labels]) / 2).max() <= 1

    with pytest.raises(SystemExit):  # --matched needs the test split's metrics.json
        segment(toy_root, trained, "--input", str(photos), "--out", str(matched), "--matched", "true",
                "--results_dir", str(tmp_path / "none"))
    # the evaluation's report of this model, with a made-up assignment that permutes every cluster
    settings = json.loads((artifact_dir(trained) / "cluster_tr.json").read_text())["settings"]
    made_from = {name: file_record(artifact_dir(trained) / f"{name}_tr.pth") for name in ("segment", "cluster")}
    assignment = np.array([3, 0, 1, 2])
    report = tmp_path / "results" / "toy" / "TR" / "random_vit_tiny_8" / str(K) / "metrics.json"
    report.parent.mkdir(parents=True)
    report.write_text(json.dumps({"settings": settings, "upstream": made_from,
                                  "unsupervised": {"assignment": assignment.tolist()}}))
    segment(toy_root, trained, "--input", str(photos), "--out", str(matched), "--matched", "true",
            "--results_dir", str(tmp_path / "results"))
    for name in ("wide", "sub/tall"):
        raw_ids = read(raw / f"{name}_labels.png")
        np.testing.assert_array_equal(read(matched / f"{name}_labels.png"), assignment[raw_ids])

    report.write_text(json.dumps({"settings": {**settings, "num_codebook": 7}, "unsupervised": {}}))
    with pytest.raises(SystemExit):  # an evaluation of another model
        segment(toy_root, trained, "--input", str(photos), "--out", str(matched), "--matched", "true",
                "--results_dir", str(tmp_path / "results"))


@pytest.mark.slow
def test_crf_on_request_and_published_mlp_files(toy_root, photos, tmp_path):
    """An MLP head in the published layout (no JSON), run at the image's own aspect, with the CRF."""
    save_random_mlp(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'wide.png'}\n{photos / 'sub' / 'tall.jpg'}\n")
    segment(toy_root, tmp_path, "--structure", "MLP", "--input", str(listing), "--out", str(tmp_path / "o"),
            "--crf", "true")
    assert read(tmp_path / "o" / "wide_labels.png").shape == (97, 211)
    assert read(tmp_path / "o" / "tall_seg.png").shape == (150, 60, 3)


def test_working_size_keeps_aspect_for_mlp_and_uses_the_training_square_for_tr():
    derived = SimpleNamespace(patch_size=8, test_resolution=320, train_resolution=224)
    mlp, tr = SimpleNamespace(structure="MLP", derived=derived), SimpleNamespace(structure="TR", derived=derived)
    assert working_size(mlp, 480, 640) == (320, 424)     # 640 * 2/3 = 426.7 -> nearest multiple of 8
    assert working_size(mlp, 1000, 100) == (3200, 320)
    assert working_size(tr, 480, 640) == (224, 224)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def same_names(path: Path) -> Path:
    """A folder holding a.png and a.jpg: both would write a_seg.png."""
    folder(path)
    for suffix in (".png", ".jpg"):
        Image.new("RGB", (16, 16)).save(path / f"a{suffix}")
    return path


@pytest.mark.parametrize("make,expected", [
    (lambda d: d / "missing", "--input {} not found"),
    (lambda d: folder(d / "empty"), "no images"),
    (lambda d: write(d / "list.txt", "nope.png\n"), "nope.png listed in"),
    (lambda d: write(d / "bad.png", "not an image"), "unreadable image {}"),
    (lambda d: write(d / "notes.csv", "x"), "expected an image"),
    (lambda d: same_names(d / "dup"), "several images named a "),
])
def test_bad_input_is_one_line(make, expected, toy_root, tmp_path, capsys):
    save_random_mlp(tmp_path)
    path = make(tmp_path)
    with pytest.raises(SystemExit) as e:
        segment(toy_root, tmp_path, "--structure", "MLP", "--input", str(path), "--out", str(tmp_path / "o"))
    assert e.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bar
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected.format(path) in errors[0]
