"""test_tr.py / test_kmeans.py end to end on the toy set: every output, metrics recomputed from the saved maps,
published-layout checkpoints, unlabeled folders, and the errors a user can run into."""
from __future__ import annotations

import json
from argparse import Namespace
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from loader.class_names import class_palette
from utils.visualize import cluster_palette
from stages.baseline import kmeans_baseline
from tests.conftest import cli
from stages.evaluate import evaluate
from tests.test_segment import _LINEAR, _PROJECTION, _TR_HEAD
from tests.toy_fixtures import C, CKPT, D, K, P, R, RES, artifact_dir, flags, results_dir, save_published, train_toy
from utils.config import dataset_folder

pytestmark = pytest.mark.slow
N_VAL = 48  # images in the toy val split
FOLDERS = ("imgs", "labels", "kmeans", "crfs", "hungarians", "panels")


@pytest.fixture(scope="module")
def trained(toy_root: Path) -> Path:
    return train_toy(toy_root)


@pytest.fixture(scope="module")
def evaluated(trained: Path, toy_root: Path) -> Path:
    cli("test_tr", "TR", evaluate, flags(toy_root, trained))
    return results_dir(trained)


def scores_from_maps(pred: np.ndarray, label: np.ndarray, n: int, match: bool) -> tuple[float, float]:
    """(mIoU, Acc) in percent from flat predictions and labels: histogram, optional Hungarian matching."""
    keep = (label >= 0) & (label < n)
    hist = np.zeros((n, n), np.int64)                       # (predicted cluster, true class)
    np.add.at(hist, (pred[keep], label[keep]), 1)
    if match:
        rows, cols = linear_sum_assignment(-hist)
        hist = hist[rows[np.argsort(cols)]]                 # row c: the cluster matched to class c
    tp = np.diag(hist).astype(float)
    union = hist.sum(0) + hist.sum(1) - tp
    iou = np.divide(tp, union, out=np.full(n, np.nan), where=union > 0)
    return float(np.nanmean(iou) * 100), float(tp.sum() / hist.sum() * 100)


def test_every_output_exists_and_metrics_match_the_saved_maps(evaluated: Path) -> None:
    for folder in FOLDERS:
        names = sorted(p.name for p in (evaluated / folder).iterdir())
        assert names == sorted(f"{folder}_{i}.png" for i in range(N_VAL)), folder
    for name in ("metrics.json", "class_iou.png", "confusion.png"):
        assert (evaluated / name).stat().st_size > 0
    report = json.loads((evaluated / "metrics.json").read_text())
    maps = [np.load(evaluated / "maps" / f"maps_{i}.npz") for i in range(N_VAL)]
    label = np.concatenate([m["label"].ravel() for m in maps]).astype(np.int64)
    assert label.shape == (N_VAL * RES * RES,)
    for name, key, match in (("unsupervised", "cluster", True), ("unsupervised_crf", "crf", True),
                             ("linear", "linear", False)):
        pred = np.concatenate([m[key].ravel() for m in maps]).astype(np.int64)
        miou, acc = scores_from_maps(pred, label, C, match)
        assert report[name]["mIoU"] == pytest.approx(miou, abs=1e-6), name
        assert report[name]["Acc"] == pytest.approx(acc, abs=1e-6), name
    assert report["classes"] == ["sky", "grass", "water", "object"]
    assert report["images"] == N_VAL and report["flags"]["test_resolution"] == RES
    assert report["checkpoints"]["segment"].endswith("segment_tr.pth")
    assert report["checkpoints"]["cluster_provenance"]["stage"] == "fine_tuning_tr"


def test_pictures_show_the_maps(evaluated: Path) -> None:
    report = json.loads((evaluated / "metrics.json").read_text())
    assignment = np.array(report["unsupervised_crf"]["assignment"])
    palette = class_palette("toy")
    clusters = cluster_palette(C, palette)
    maps = np.load(evaluated / "maps" / "maps_3.npz")
    picture = lambda folder: np.asarray(Image.open(evaluated / folder / f"{folder}_3.png").convert("RGB"))  # noqa: E731
    np.testing.assert_array_equal(picture("crfs"), clusters[maps["crf"]])        # raw ids: cluster colours
    np.testing.assert_array_equal(picture("kmeans"), clusters[maps["cluster"]])
    np.testing.assert_array_equal(picture("hungarians"), palette[assignment[maps["crf"]]])
    np.testing.assert_array_equal(picture("labels"), palette[maps["label"]])
    assert picture("imgs").shape == (RES, RES, 3)
    assert picture("panels").shape[1] > 5 * RES


def published_layout(head: list, sizes: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of a published segment_tr.pth, from the key list tests/test_segment.py pins."""
    keys = [(f"{part}.{name}", shape) for part, entries in (
        ("head", head), ("projection_head", _PROJECTION), ("head_ema", head),
        ("projection_head_ema", _PROJECTION)) for name, shape in entries] + _LINEAR
    return [(k, tuple(sizes.get(s, s) for s in shape)) for k, shape in keys]


def test_published_checkpoints_load_unchanged(evaluated: Path, trained: Path, toy_root: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """Plain state dicts in the published key order and shapes, no JSON: same numbers as our files."""
    ours = torch.load(artifact_dir(trained) / "segment_tr.pth")
    layout = published_layout(_TR_HEAD, {"D": D, "3D": 3 * D, "Q": (RES // 8) ** 2, "r": R, "p": P, "C": C})
    segment = OrderedDict((k, ours[k].clone()) for k, _ in layout)
    assert [(k, tuple(v.shape)) for k, v in segment.items()] == layout
    cluster = torch.load(artifact_dir(trained) / "cluster_tr.pth")
    assert [(k, tuple(v.shape)) for k, v in cluster.items()] == [("codebook", (K, D)), ("cluster_probe", (C, R))]
    save_published(segment, artifact_dir(tmp_path) / "segment_tr.pth")
    save_published(OrderedDict(cluster), artifact_dir(tmp_path) / "cluster_tr.pth")
    cli("test_tr", "TR", evaluate, flags(toy_root, tmp_path, save_images=0))
    got = json.loads((results_dir(tmp_path) / "metrics.json").read_text())
    want = json.loads((evaluated / "metrics.json").read_text())
    for name in ("unsupervised", "unsupervised_crf", "linear"):
        assert got[name]["mIoU"] == want[name]["mIoU"] and got[name]["Acc"] == want[name]["Acc"]
    assert got["checkpoints"]["segment_provenance"] is None
    assert not (results_dir(tmp_path) / "imgs").exists()  # --save_images 0

    cluster["cluster_probe"] = torch.zeros(27, R)  # e.g. a cocostuff27 file
    save_published(OrderedDict(cluster), artifact_dir(tmp_path) / "cluster_tr.pth")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli("test_tr", "TR", evaluate, flags(toy_root, tmp_path))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "cluster_tr.pth" in err and f"cluster_probe (27, 90) vs ({C}, 90)" in err and len(err.splitlines()) == 1


def test_tr_at_another_resolution_is_one_clear_error(trained: Path, toy_root: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli("test_tr", "TR", evaluate, flags(toy_root, trained, test_resolution=2 * RES))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"trained at resolution {RES}" in err and f"--test_resolution {RES}" in err


def test_unlabeled_folder_writes_cluster_and_crf_maps_without_metrics(trained: Path, toy_root: Path,
                                                                       tmp_path: Path, capsys) -> None:
    images = tmp_path / "photos"
    images.mkdir()
    for i, src in enumerate(sorted((toy_root / "data" / "toy" / "images" / "val").glob("*.png"))[:3]):
        (images / f"photo{i}.png").write_bytes(src.read_bytes())
    tag = dataset_folder(Namespace(dataset="directory", data_dir=images))  # each folder has its own artifacts
    for name in ("segment_tr.pth", "cluster_tr.pth"):  # a model from elsewhere: no provenance to compare
        save_published(torch.load(artifact_dir(trained) / name), artifact_dir(tmp_path, tag) / name)
    cli("test_tr", "TR", evaluate, flags(toy_root, tmp_path, dataset="directory", data_dir=images, n_classes=C))
    out = results_dir(tmp_path, dataset=tag)
    assert "has no labels: metrics and Hungarian maps skipped" in capsys.readouterr().out
    for folder in ("imgs", "kmeans", "crfs", "panels"):
        assert sorted(p.name for p in (out / folder).iterdir()) == [f"{folder}_{i}.png" for i in range(3)]
    assert not (out / "metrics.json").exists()
    assert not (out / "labels").exists() and not (out / "hungarians").exists()


def test_kmeans_baseline_writes_the_same_report(toy_root: Path, tmp_path: Path) -> None:
    cli("test_kmeans", None, kmeans_baseline, flags(toy_root, tmp_path, save_images=2, kmeans_samples=2000))
    out = tmp_path / "results" / "toy" / "KMEANS" / CKPT / str(C)
    report = json.loads((out / "metrics.json").read_text())
    assert set(report) >= {"unsupervised", "unsupervised_crf", "settings", "checkpoints", "flags", "classes"}
    assert "linear" not in report
    assert report["settings"]["fit_split"] == "val" and report["settings"]["n_clusters"] == C
    for name in ("unsupervised", "unsupervised_crf"):
        hist = np.array(report[name]["histogram"])
        assert hist.shape == (C, C) and hist.sum() == N_VAL * RES * RES  # every toy pixel is labelled
        assert sorted(report[name]["assignment"]) == list(range(C))
        assert 0 < report[name]["mIoU"] <= 100
    for folder in FOLDERS:
        assert sorted(p.name for p in (out / folder).iterdir()) == [f"{folder}_0.png", f"{folder}_1.png"]
    assert (out / "class_iou.png").is_file() and (out / "confusion.png").is_file()
