"""Provenance (issue 14): the data an artifact was made from, the files upstream of it, the modes files
are written with, and the cached k-means baseline. Every refusal also checks that nothing was touched."""
from __future__ import annotations

import argparse
import builtins
import hashlib
import json
import os
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loader.cropping import write_cropped_set
from loader.files import FileList
from loader.fingerprint import data_fingerprint
from loader.toy import TOY_CLASSES, ensure_toy
from models import save_random_checkpoint
from stages.artifacts import SCRIPTS
from stages.inference import main as segment_images
from tests.conftest import TOY_CKPT, TOY_K, toy_flags
from tests.conftest import toy_artifact_dir as artifacts
from tests.conftest import toy_codebook_path as codebook
from tests.test_datasets import make_cityscapes
from tests.test_reliability import copy_run, error_of, run, snapshot
from utils.config import dataset_folder
from utils.errors import UserError
from utils.io import atomic_write, file_record, save_json, save_numpy, save_torch
from utils.visualize import save_image

# One step per stage at 64 px: enough to write every artifact.
TINY = {"train_resolution": 64, "test_resolution": 64, "max_steps": 1, "epoch": 1, "save_images": 0}


def go(stage: str, root: Path, out: Path, **flags: object) -> None:
    run(stage, root, out, **{**TINY, **flags})


def refused(capsys: pytest.CaptureFixture, stage: str, root: Path, out: Path, **flags: object) -> str:
    return error_of(capsys, stage, root, out, **{**TINY, **flags})


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def meta(artifact: Path) -> dict:
    return json.loads(artifact.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def chain(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Codebook, TR segment head and cluster probe, one step each."""
    out = tmp_path_factory.mktemp("chain")
    for stage in ("mediator", "front_door_tr", "fine_tuning_tr"):
        go(stage, toy_root, out)
    return out


@pytest.fixture
def fresh(chain: Path, tmp_path: Path) -> Path:
    return copy_run(chain, tmp_path)


# --- defect 1: the data an artifact was made from --------------------------------------------------

def test_fingerprint_stats_only_and_tells_data_apart(tmp_path, monkeypatch):
    root = tmp_path / "a"
    sizes = {"img/x.png": 10, "img/sub/y.png": 20, "lab/x.png": 3, "lab/sub/y.png": 4}
    for name, size in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"z" * size)
    names = list(sizes)
    files = FileList([root / n for n in names[:2]], [root / n for n in names[2:]])
    listing = "".join(f"{n}\t{s}\n" for n, s in sizes.items())
    expected = f"4 files, 37 bytes, sha256 {hashlib.sha256(listing.encode()).hexdigest()[:16]}"
    with monkeypatch.context() as m:  # stat only: opening any file would fail
        m.setattr(builtins, "open", lambda *a, **k: pytest.fail("the fingerprint opened a file"))
        assert data_fingerprint(files, root) == expected
    shutil.copytree(root, tmp_path / "b")  # the same files elsewhere: the same fingerprint
    moved = FileList([tmp_path / "b" / n for n in names[:2]], [tmp_path / "b" / n for n in names[2:]])
    assert data_fingerprint(moved, tmp_path / "b") == expected
    (root / "img/x.png").write_bytes(b"z" * 11)  # one byte more
    assert data_fingerprint(files, root) != expected
    (root / "img/x.png").write_bytes(b"z" * 10)
    (root / "img/x.png").rename(root / "img/w.png")  # same sizes, another name
    renamed = FileList([root / "img/w.png", root / names[1]], files.labels)
    assert data_fingerprint(renamed, root) != expected
    with pytest.raises(UserError, match=f"data file not found: {root / 'img/x.png'}"):
        data_fingerprint(files, root)


def toy_images(folder: Path, toy_root: Path, first: int, count: int = 4) -> Path:
    """`folder` holding `count` toy val images (unlabeled), starting at image `first`."""
    folder.mkdir(parents=True)
    sources = sorted((ensure_toy(toy_root / "data") / "images" / "val").glob("*.png"))[first:first + count]
    for src in sources:
        shutil.copy(src, folder / src.name)
    return folder


def directory_codebook(out: Path, folder: Path) -> Path:
    name = dataset_folder(argparse.Namespace(dataset="directory", data_dir=folder))
    return out / "CAUSE" / name / "modularity" / TOY_CKPT / str(TOY_K) / "modular.npy"


@pytest.mark.slow
def test_two_folders_never_share_a_codebook(toy_root, tmp_path, capsys, monkeypatch):
    folders = [toy_images(tmp_path / name, toy_root, first) for name, first in (("a", 0), ("b", 4))]
    flags = {"dataset": "directory", "n_classes": len(TOY_CLASSES), "batch_size": 4}
    for folder in folders:
        go("mediator", toy_root, tmp_path, data_dir=folder, **flags)
        assert "nothing to do" not in capsys.readouterr().out
    paths = [directory_codebook(tmp_path, f) for f in folders]
    assert paths[0] != paths[1] and all(p.is_file() for p in paths)
    records = [meta(p)["settings"] for p in paths]
    assert [r["data_dir"] for r in records] == [str(f.resolve()) for f in folders]
    assert records[0]["data.train"] != records[1]["data.train"]
    assert records[0]["data.train"].startswith("4 files, ")
    logs = sorted((tmp_path / "logs").glob("directory_*"))  # TensorBoard scalars: a folder per data folder too
    assert [p.name for p in logs] == sorted(dataset_folder(argparse.Namespace(dataset="directory", data_dir=f))
                                            for f in folders)
    monkeypatch.chdir(tmp_path)  # the same folder spelt another way: the same artifact
    go("mediator", toy_root, tmp_path, data_dir="a", **flags)
    assert "already exists with these settings; nothing to do" in capsys.readouterr().out
    shutil.copy(folders[1] / next(iter(os.listdir(folders[1]))), folders[0] / "new.png")  # the folder changed
    before = snapshot(tmp_path)
    line = refused(capsys, "mediator", toy_root, tmp_path, data_dir=folders[0], **flags)
    assert f"{paths[0]} already exists and was made with other settings (data.train: artifact has '4 files" in line
    assert "this run has '5 files" in line
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_published_dataset_in_another_folder_is_refused(fresh, toy_root, tmp_path, capsys):
    other = tmp_path / "copy"
    shutil.copytree(ensure_toy(toy_root / "data"), other / "toy")
    before = snapshot(fresh)
    names = f"(data_dir: artifact has '{(toy_root / 'data').resolve()}', this run has '{other.resolve()}')"
    line = refused(capsys, "front_door_tr", toy_root, fresh, data_dir=other)
    assert f"{artifacts(fresh) / 'segment_tr.pth'} already exists and was made with other settings {names}" in line
    line = refused(capsys, "test_tr", toy_root, fresh, data_dir=other)
    assert f"{artifacts(fresh) / 'segment_tr.pth'} was made with other settings {names}" in line
    assert snapshot(fresh) == before


@pytest.mark.slow
def test_the_pre_cropped_training_set_is_what_is_fingerprinted(toy_root, tmp_path, capsys):
    data = tmp_path / "data"
    labels = {("bonn", f"bonn_00000{i}"): np.full((16, 20), 7 + i, np.uint8) for i in range(2)}
    make_cityscapes(data, "train", labels)
    crops, _ = write_cropped_set("cityscapes", data, "five", progress=False)
    go("mediator", toy_root, tmp_path, dataset="cityscapes", data_dir=data, batch_size=4)
    cropped = sorted(p for p in crops.rglob("*") if p.is_file())
    fingerprint = meta(tmp_path / "CAUSE" / "cityscapes" / "modularity" / TOY_CKPT / str(TOY_K) / "modular.npy")
    assert fingerprint["settings"]["data.train"].startswith(f"20 files, {sum(p.stat().st_size for p in cropped)} "
                                                            "bytes")
    with open(crops / "img" / "train" / "3.jpg", "ab") as f:
        f.write(b"\0")
    line = refused(capsys, "mediator", toy_root, tmp_path, dataset="cityscapes", data_dir=data, batch_size=4)
    assert "already exists and was made with other settings (data.train: artifact has '20 files" in line


# --- defect 2: the files upstream of an artifact ----------------------------------------------------

def rebuild(line: str, root: Path, out: Path) -> None:
    """Run the command printed after `rebuild it: ` in-process."""
    words = shlex.split(line.split("rebuild it: ", 1)[1].split(", then")[0])
    assert words[0] == "python" and words[-1] == "--overwrite"
    stage = next(s for s, script in SCRIPTS.items() if script == words[1])
    run(stage, root, out, overwrite=True, **dict(zip((w[2:] for w in words[2:-1:2]), words[3:-1:2])))


@pytest.mark.slow
def test_heads_made_from_an_old_codebook_are_refused_until_rebuilt(fresh, toy_root, capsys):
    segment, cluster = artifacts(fresh) / "segment_tr.pth", artifacts(fresh) / "cluster_tr.pth"
    old = sha(codebook(fresh))
    go("mediator", toy_root, fresh, lr=0.01, overwrite=True)  # another codebook in the same folder (a seed
    # would get a folder of its own)
    assert sha(codebook(fresh)) != old
    before = snapshot(fresh)
    stale = f"is out of date: it was made from {codebook(fresh)} with sha256 {old[:12]}, which has changed since"
    line = refused(capsys, "front_door_tr", toy_root, fresh)
    assert f"{segment} {stale}" in line and "rebuild it: python train_front_door_tr.py --dataset toy" in line
    assert line.endswith("--overwrite")
    line = refused(capsys, "fine_tuning_tr", toy_root, fresh)
    assert f"{cluster} {stale}" in line and "rebuild it: python fine_tuning_tr.py" in line
    line = refused(capsys, "test_tr", toy_root, fresh)
    assert f"{segment} {stale}" in line and "train_front_door_tr.py" in line
    assert line.endswith("--overwrite, then the stages after it")
    assert snapshot(fresh) == before
    rebuild(line, toy_root, fresh)  # the printed command rebuilds the segment head from the new codebook
    assert meta(segment)["upstream"]["codebook"]["sha256"] == sha(codebook(fresh))
    go("fine_tuning_tr", toy_root, fresh, overwrite=True)
    go("front_door_tr", toy_root, fresh, lr=0.01, overwrite=True)  # the segment head alone changes
    before = snapshot(fresh)
    line = refused(capsys, "fine_tuning_tr", toy_root, fresh)
    assert f"{cluster} is out of date: it was made from {segment}" in line and "fine_tuning_tr.py" in line
    line = refused(capsys, "test_tr", toy_root, fresh)
    assert f"{cluster} is out of date: it was made from {segment}" in line and "fine_tuning_tr.py" in line
    assert snapshot(fresh) == before
    front_door = sha(segment)
    go("fine_tuning_tr", toy_root, fresh, overwrite=True)
    # The chain stays checkable although stage 3 rewrites the segment file.
    assert meta(segment)["upstream"]["front_door_segment"]["sha256"] == front_door
    assert meta(cluster)["upstream"]["segment"]["sha256"] == sha(segment) != front_door
    for artifact in (codebook(fresh), segment, cluster):
        assert meta(artifact)["sha256"] == sha(artifact)
        assert meta(artifact)["upstream"]["backbone"]["sha256"] == sha(toy_root / f"{TOY_CKPT}.pth")
    go("fine_tuning_tr", toy_root, fresh)
    assert "already exists with these settings; nothing to do" in capsys.readouterr().out


@pytest.mark.slow
def test_a_changed_backbone_file_makes_every_artifact_stale(fresh, toy_root, tmp_path, capsys):
    ckpt = tmp_path / f"{TOY_CKPT}.pth"
    shutil.copy(toy_root / f"{TOY_CKPT}.pth", ckpt)  # same bytes: the artifacts still fit
    go("fine_tuning_tr", toy_root, fresh, ckpt=ckpt)
    assert "nothing to do" in capsys.readouterr().out
    save_random_checkpoint(TOY_CKPT, ckpt, seed=1)
    before = snapshot(fresh)
    line = refused(capsys, "front_door_tr", toy_root, fresh, ckpt=ckpt, overwrite=True)
    assert f"{codebook(fresh)} is out of date: it was made from {ckpt}" in line
    assert "rebuild it: python train_mediator.py" in line
    line = refused(capsys, "test_tr", toy_root, fresh, ckpt=ckpt)
    assert f"{artifacts(fresh) / 'segment_tr.pth'} is out of date: it was made from {ckpt}" in line
    assert snapshot(fresh) == before


@pytest.mark.slow
def test_an_artifact_replaced_under_its_json_is_refused(fresh, toy_root, capsys):
    segment = artifacts(fresh) / "segment_tr.pth"
    state = torch.load(segment)
    state["linear.f.weight"] += 1
    torch.save(state, segment)
    before = snapshot(fresh)
    line = refused(capsys, "test_tr", toy_root, fresh)
    assert f"{segment.with_suffix('.json')} describes another file than {segment}" in line
    assert snapshot(fresh) == before


@pytest.mark.slow
def test_matched_segmentation_refuses_the_report_of_other_trained_files(fresh, toy_root, tmp_path, capsys):
    photo = sorted((ensure_toy(toy_root / "data") / "images" / "val").glob("*.png"))[0]
    argv = toy_flags(toy_root, fresh, "segment_images", train_resolution=64, test_resolution=64) + [
        "--input", str(photo), "--out", str(tmp_path / "seg"), "--matched", "true"]
    cluster = artifacts(fresh) / "cluster_tr.pth"
    report = fresh / "results" / "toy" / "TR" / TOY_CKPT / str(TOY_K) / "metrics.json"
    save_json({"settings": meta(cluster)["settings"], "unsupervised": {"assignment": [3, 0, 1, 2]},
               "upstream": {name: file_record(artifacts(fresh) / f"{name}_tr.pth") for name in ("segment", "cluster")}},
              report)
    segment_images(argv)  # the report of these very files: used
    assert (tmp_path / "seg" / f"{photo.stem}_labels.png").is_file()
    old = sha(cluster)
    go("fine_tuning_tr", toy_root, fresh, lr=0.01, overwrite=True)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        segment_images(argv)
    line = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in line
    assert line.startswith(f"error: {report} was made from other trained files (")
    assert f"cluster {cluster.resolve()}: sha256 recorded {old[:12]}, now {sha(cluster)[:12]}" in line


# --- defect 3: file modes follow the umask ----------------------------------------------------------

@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o002], indirect=True)
def test_every_writer_follows_the_umask(umask, tmp_path):
    writers = {
        "plain.txt": lambda p: atomic_write(p, lambda tmp: Path(tmp).write_text("x")),
        "a.json": lambda p: save_json({"a": 1}, p),
        "a.pth": lambda p: save_torch({"w": torch.zeros(2)}, p),
        "a.npy": lambda p: save_numpy(np.zeros(2), p),
        "a.png": lambda p: save_image(p, np.zeros((2, 2, 3), np.uint8)),
    }
    for name, write in writers.items():
        write(tmp_path / name)
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    write(tmp_path / "a.png")  # replacing a file: the new one has the same mode
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o002], indirect=True)
def test_stage_outputs_and_the_toy_set_follow_the_umask(umask, toy_root, tmp_path, monkeypatch):
    go("mediator", toy_root, tmp_path, batch_size=4)
    for path in (codebook(tmp_path), codebook(tmp_path).with_suffix(".json")):
        assert path.stat().st_mode & 0o777 == 0o664, path
    monkeypatch.setattr("loader.toy.TOY_COUNTS", {"train": 1, "val": 1})
    assert ensure_toy(tmp_path / "data").stat().st_mode & 0o777 == 0o775


# --- the k-means baseline is cached under the same rules ----------------------------------------------

@pytest.mark.slow
def test_kmeans_baseline_is_reused_until_something_changes(toy_root, tmp_path, capsys, monkeypatch):
    ckpt, data = tmp_path / f"{TOY_CKPT}.pth", tmp_path / "labelled"
    shutil.copy(toy_root / f"{TOY_CKPT}.pth", ckpt)
    toy = ensure_toy(toy_root / "data")
    for kind in ("images", "labels"):  # four labelled toy images: a report is written, so it can be reused
        toy_images(data / kind, toy_root, 0)
        for path in (data / kind).iterdir():
            shutil.copy(toy / kind / "val" / path.name, path)
    flags = {"ckpt": ckpt, "kmeans_samples": 500, "dataset": "directory", "data_dir": data,
             "n_classes": len(TOY_CLASSES)}
    go("test_kmeans", toy_root, tmp_path, **flags)
    folder = dataset_folder(argparse.Namespace(dataset="directory", data_dir=data))
    report = tmp_path / "results" / folder / "KMEANS" / TOY_CKPT / str(len(TOY_CLASSES)) / "metrics.json"
    first = report.read_bytes()
    scores = json.loads(first)["unsupervised_crf"]
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr("stages.baseline.kmeans_fit", lambda *a, **k: pytest.fail("k-means was fitted again"))
        go("test_kmeans", toy_root, tmp_path, **flags)
        out = capsys.readouterr().out
        assert f"{report} already holds the k-means baseline of these settings" in out
        assert f"unsupervised_crf: mIoU {scores['mIoU']:.2f}  Acc {scores['Acc']:.2f}" in out
        assert report.read_bytes() == first
        line = refused(capsys, "test_kmeans", toy_root, tmp_path, **{**flags, "kmeans_samples": 400})
        assert f"{report} already exists and was made otherwise (kmeans_samples: recorded 500, this run has 400)" \
            in line
        save_random_checkpoint(TOY_CKPT, ckpt, seed=1)
        line = refused(capsys, "test_kmeans", toy_root, tmp_path, **flags)
        assert f"backbone {ckpt.resolve()}: sha256 recorded {sha(toy_root / f'{TOY_CKPT}.pth')[:12]}" in line
        assert report.read_bytes() == first
    go("test_kmeans", toy_root, tmp_path, overwrite=True, **flags)
    assert json.loads(report.read_text())["upstream"]["backbone"]["sha256"] == sha(ckpt)


def test_equal_objects_saved_anywhere_give_equal_bytes(tmp_path):
    """The archive inside a .pth is not named after the random temp file: a requeued job's artifact can
    equal an uninterrupted one's byte for byte."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    first, second = tmp_path / "a" / "segment_tr.pth", tmp_path / "b" / "other_name.pth"
    save_torch(state, first)
    save_torch(state, second)
    assert first.read_bytes() == second.read_bytes()
    assert torch.equal(torch.load(second)["w"], state["w"])
