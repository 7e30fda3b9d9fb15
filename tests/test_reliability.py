"""Reliability of the stage scripts: one clear error line per bad input, provenance, atomic writes,
resume, non-finite losses. Every failing case also checks that no artifact was touched."""
from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loader.sampler import EpochSampler
from loader.toy import ensure_toy
from modules.functional import modularity_loss
from tests.conftest import cli
from stages.trainer import Trainer
from tests.conftest import TOY_K as K
from tests.conftest import toy_artifact_dir as artifacts
from tests.conftest import toy_codebook_path as codebook
from tests.conftest import toy_flags
from utils.io import write_download_record

STAGES = {  # stage name -> (structure, stage function)
    "mediator": (None, "stages.mediator:train_mediator"),
    "front_door_tr": ("TR", "stages.front_door:train_front_door"),
    "fine_tuning_tr": ("TR", "stages.fine_tuning:fine_tune"),
    "test_tr": ("TR", "stages.evaluate:evaluate"),
    "test_kmeans": (None, "stages.baseline:kmeans_baseline"),
}


class Interrupted(Exception):
    """Stands for a kill: raised in-process at a chosen moment."""


def run(stage: str, root: Path, out: Path, resume: bool = False, overwrite: bool = False, **flags: object) -> None:
    """The stage in-process on the toy set; `resume` / `overwrite` become the bare switches."""
    structure, target = STAGES[stage]
    module, function = target.split(":")
    switches = ["--resume"] * resume + ["--overwrite"] * overwrite
    cli(stage, structure, getattr(importlib.import_module(module), function),
        argv=toy_flags(root, out, **flags) + switches)


def error_of(capsys: pytest.CaptureFixture, stage: str, root: Path, out: Path, **flags: object) -> str:
    """Run a stage that must stop on bad input: exit status 2 and exactly one `error:` line, no traceback."""
    with pytest.raises(SystemExit) as e:
        run(stage, root, out, **flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(out: Path) -> dict[str, str]:
    """sha256 of every file under `out`/CAUSE (artifacts, JSON, states), by relative path."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "CAUSE").rglob("*")) if p.is_file()}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "CAUSE", dst / "CAUSE")
    return dst


@pytest.fixture(scope="module")
def trained(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All three TR stages, two steps each."""
    out = tmp_path_factory.mktemp("trained")
    for stage in ("mediator", "front_door_tr", "fine_tuning_tr"):
        run(stage, toy_root, out, epoch=1)
    return out


@pytest.fixture
def fresh(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained artifacts."""
    return copy_run(trained, tmp_path)


# --- bad input: one line naming the thing ---------------------------------------------------------

def test_missing_or_wrong_data_dir(toy_root, tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    line = error_of(capsys, "mediator", toy_root, tmp_path, dataset="directory", data_dir=nowhere)
    assert f"data directory not found: expected the folder {nowhere}" in line
    (tmp_path / "data").mkdir()  # a folder without the dataset: COCO-Stuff trains on its pre-cropped set
    line = error_of(capsys, "mediator", toy_root, tmp_path, dataset="cocostuff27", data_dir=tmp_path / "data")
    assert f"pre-cropped training set not found: expected {tmp_path / 'data' / 'cocostuff' / 'cropped'}" in line
    assert "crop_dataset.py" in line
    assert snapshot(tmp_path) == {}


def test_dataset_folder_without_split_lists(toy_root, tmp_path, capsys):
    (tmp_path / "data" / "toy" / "images").mkdir(parents=True)
    line = error_of(capsys, "mediator", toy_root, tmp_path, data_dir=tmp_path / "data")
    assert f"list file not found: expected {tmp_path / 'data' / 'toy' / 'train.txt'}" in line


def first_read_item(root: Path) -> str:
    """Id of the first training image a seed-0 single-process run reads."""
    ids = (root / "train.txt").read_text().split()
    return ids[EpochSampler(len(ids), seed=0, epoch=0).indices()[0]]


@pytest.mark.parametrize("kind,workers", [("images", 0), ("labels", 0), ("images", 2)])
def test_unreadable_image_or_label_is_named(kind, workers, toy_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(ensure_toy(toy_root / "data"), data / "toy")
    bad = data / "toy" / kind / "train" / f"{first_read_item(data / 'toy')}.png"
    bad.write_bytes(b"not a png")
    line = error_of(capsys, "mediator", toy_root, tmp_path, data_dir=data, num_workers=workers)
    assert f"cannot read {kind[:-1]} {bad}" in line
    assert not codebook(tmp_path).exists()


@pytest.mark.parametrize("name,damage,expected", [
    ("random_vit_tiny_8", "missing", "no such checkpoint file"),
    ("random_vit_tiny_8", "truncate", "cannot read the checkpoint (truncated or corrupt?)"),
    ("mae_vit_base_16", "copy", "expected the mae checkpoint layout"),
    ("dino_vit_gigantic_8", "copy", "unknown backbone name 'dino_vit_gigantic_8'"),
])
def test_bad_backbone_checkpoint(name, damage, expected, toy_root, tmp_path, capsys):
    ckpt = tmp_path / f"{name}.pth"
    data = (toy_root / "random_vit_tiny_8.pth").read_bytes()
    if damage != "missing":
        ckpt.write_bytes(data[: len(data) // 2] if damage == "truncate" else data)
    line = error_of(capsys, "mediator", toy_root, tmp_path, ckpt=ckpt)
    assert expected in line and name in line


def test_resolution_not_divisible_by_patch(toy_root, tmp_path, capsys):
    line = error_of(capsys, "mediator", toy_root, tmp_path, train_resolution=100)
    assert "--train_resolution 100 is not divisible by the backbone patch size 8 (try 104)" in line


def test_tr_model_tested_at_another_resolution(trained, toy_root, capsys):
    before = snapshot(trained)
    line = error_of(capsys, "test_tr", toy_root, trained, test_resolution=64)
    assert "trained at resolution 128" in line and "64" in line
    assert snapshot(trained) == before


def test_stage_started_before_the_one_it_needs(trained, toy_root, tmp_path, capsys):
    out = tmp_path
    codebook(out).parent.mkdir(parents=True)
    shutil.copy(codebook(trained), codebook(out))
    shutil.copy(codebook(trained).with_suffix(".json"), codebook(out).with_suffix(".json"))
    before = snapshot(out)
    line = error_of(capsys, "fine_tuning_tr", toy_root, out)
    assert f"segment head not found: {artifacts(out) / 'segment_tr.pth'}" in line
    assert "run train_front_door_tr.py first" in line
    assert snapshot(out) == before
    artifacts(out).mkdir(parents=True, exist_ok=True)
    shutil.copy(artifacts(trained) / "segment_tr.pth", artifacts(out) / "segment_tr.pth")
    before = snapshot(out)
    line = error_of(capsys, "test_tr", toy_root, out)
    assert f"cluster probe not found: {artifacts(out) / 'cluster_tr.pth'}" in line
    assert "run fine_tuning_tr.py first" in line
    assert snapshot(out) == before


def test_codebook_made_for_other_settings_or_shape(fresh, toy_root, capsys):
    meta_path = codebook(fresh).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["settings"]["dataset"] = "cocostuff27"  # e.g. a codebook copied over from another dataset
    meta_path.write_text(json.dumps(meta))
    before = snapshot(fresh)
    line = error_of(capsys, "front_door_tr", toy_root, fresh, overwrite=True)
    assert "was made with other settings (dataset: artifact has 'cocostuff27', this run has 'toy')" in line
    meta_path.unlink()
    np.save(codebook(fresh), np.zeros((K, 100), np.float32))
    write_download_record(codebook(fresh), {"published": "elsewhere"})  # a published file: shapes decide
    before = snapshot(fresh)
    line = error_of(capsys, "front_door_tr", toy_root, fresh, overwrite=True)
    assert f"codebook {codebook(fresh)} has shape ({K}, 100), expected ({K}, 192)" in line
    assert snapshot(fresh) == before


def test_head_made_with_other_flags_shapes_or_family(fresh, toy_root, capsys):
    before = snapshot(fresh)
    line = error_of(capsys, "fine_tuning_tr", toy_root, fresh, reduced_dim=45, overwrite=True)
    assert "segment_tr.front_door.pth was made with other settings (reduced_dim: artifact has 90, this run has 45)" \
        in line  # stage 3 reads the stage-2 head it keeps
    (artifacts(fresh) / "segment_tr.json").unlink()  # a file from elsewhere: no provenance, shapes decide
    before = snapshot(fresh)
    line = error_of(capsys, "test_tr", toy_root, fresh, reduced_dim=45)
    assert "has other shapes than this run expects" in line and "head.tr.f1.weight" in line
    line = error_of(capsys, "test_tr", toy_root, fresh, segment=artifacts(fresh) / "cluster_tr.pth")
    assert "does not fit this model: missing keys" in line and "cluster_tr.pth" in line
    assert snapshot(fresh) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flags,named", [({"gpu": "0", "device": "auto"}, "--gpu 0"),
                                         ({"device": "cuda"}, "--device cuda")])
def test_gpu_asked_for_without_cuda(flags, named, toy_root, tmp_path, capsys):
    line = error_of(capsys, "mediator", toy_root, tmp_path, **flags)
    assert f"{named} asked for a GPU but CUDA is not available" in line


@pytest.mark.parametrize("flag", ["output_dir", "log_dir"])
def test_output_folder_that_cannot_be_written(flag, toy_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = error_of(capsys, "mediator", toy_root, tmp_path, **{flag: blocker / "sub"})
    assert f"cannot create output folder {blocker / 'sub'}" in line
    assert not codebook(tmp_path).exists()


# --- provenance and --overwrite ---------------------------------------------------------------------

def test_every_artifact_has_its_provenance(trained):
    for path in (codebook(trained), artifacts(trained) / "segment_tr.pth", artifacts(trained) / "cluster_tr.pth"):
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["artifact"] == path.name
        assert meta["settings"]["dataset"] == meta["flags"]["dataset"] == "toy"
        assert meta["settings"]["backbone"] == "random_vit_tiny_8"
        assert meta["flags"]["num_codebook"] == K and meta["code_version"] not in ("", None)
        assert meta["time"][:2] == "20" and "T" in meta["time"]


def test_other_settings_stop_and_overwrite_replaces(fresh, toy_root, capsys):
    segment = artifacts(fresh) / "segment_tr.pth"
    before = snapshot(fresh)
    run("front_door_tr", toy_root, fresh, epoch=1)  # the flags that made it: nothing to do
    assert "already exists with these settings; nothing to do" in capsys.readouterr().out
    line = error_of(capsys, "front_door_tr", toy_root, fresh, epoch=1, lr=0.002)
    assert f"{segment} already exists and was made with other settings " \
           "(front_door_tr.lr: artifact has 0.001, this run has 0.002); pass --overwrite" in line
    assert snapshot(fresh) == before
    run("front_door_tr", toy_root, fresh, epoch=1, lr=0.002, overwrite=True)
    meta = json.loads(segment.with_suffix(".json").read_text())
    assert meta["settings"]["front_door_tr.lr"] == 0.002 and meta["stage"] == "front_door_tr"
    assert snapshot(fresh)[str(segment.relative_to(fresh))] != before[str(segment.relative_to(fresh))]


# --- atomic writes ----------------------------------------------------------------------------------

def dies_writing(real, file_arg: int, target: str):
    """`real` (np.save, torch.save) killed half-way through writing a file named after `target`."""
    def save(*args, **kwargs):
        real(*args, **kwargs)
        file = args[file_arg]
        path = Path(getattr(file, "name", file))
        if target in path.name:
            if hasattr(file, "flush"):
                file.flush()
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise Interrupted
    return save


@pytest.mark.parametrize("stage,module,file_arg,target", [("mediator", np, 0, "modular.npy"),
                                                          ("front_door_tr", torch, 1, "segment_tr.pth")])
def test_kill_while_writing_keeps_the_old_artifact(stage, module, file_arg, target, fresh, toy_root, monkeypatch):
    before = snapshot(fresh)
    monkeypatch.setattr(module, "save", dies_writing(module.save, file_arg, target))
    with pytest.raises(Interrupted):
        run(stage, toy_root, fresh, epoch=1, overwrite=True)
    monkeypatch.undo()
    after = snapshot(fresh)
    assert {k: v for k, v in after.items() if "state_" not in k} == before
    assert not list(fresh.rglob("*.tmp"))


# --- resume -----------------------------------------------------------------------------------------

def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Kill the run just before its optimizer step number `step` + 1."""
    original = Trainer._one_step

    def one_step(self: Trainer, batch: dict):
        if self.global_step == step:
            raise Interrupted
        return original(self, batch)
    monkeypatch.setattr(Trainer, "_one_step", one_step)


def outputs(out: Path, stage: str) -> dict[str, torch.Tensor]:
    if stage == "mediator":
        return {"codebook": torch.from_numpy(np.load(codebook(out)))}
    names = ["segment_tr"] + (["cluster_tr"] if stage == "fine_tuning_tr" else [])
    return {f"{n}.{k}": v for n in names for k, v in torch.load(artifacts(out) / f"{n}.pth").items()}


@pytest.mark.slow
@pytest.mark.parametrize("stage,inputs,save_every,kill_at", [
    ("mediator", [], 1, 4),                                  # epoch 2, step 2; StepLR between
    ("front_door_tr", ["codebook"], 2, 5),                   # epoch 2, step 3: resumes mid-epoch, bank + EMA
    ("fine_tuning_tr", ["codebook", "segment_tr.pth", "segment_tr.front_door.pth"], 1, 2),  # two optimizers
])
def test_resume_gives_the_uninterrupted_result(stage, inputs, save_every, kill_at, trained, toy_root, tmp_path,
                                               monkeypatch):
    flags = {"epoch": 2, "max_steps": 3, "save_every": save_every}
    for name in ("straight", "killed"):
        out = tmp_path / name
        for item in inputs:
            src = codebook(trained) if item == "codebook" else artifacts(trained) / item
            dst = out / src.relative_to(trained)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    run(stage, toy_root, tmp_path / "straight", **flags)
    interrupt_at(monkeypatch, kill_at)
    with pytest.raises(Interrupted):
        run(stage, toy_root, tmp_path / "killed", **flags)
    monkeypatch.undo()
    state = next((tmp_path / "killed").rglob(f"state_{stage}.pth"))
    run(stage, toy_root, tmp_path / "killed", resume=True, **flags)
    assert not state.exists()
    straight, resumed = outputs(tmp_path / "straight", stage), outputs(tmp_path / "killed", stage)
    assert straight.keys() == resumed.keys()
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_resume_state_is_checked(toy_root, tmp_path, capsys, monkeypatch):
    interrupt_at(monkeypatch, 1)
    with pytest.raises(Interrupted):
        run("mediator", toy_root, tmp_path, save_every=1)
    monkeypatch.undo()
    state = codebook(tmp_path).with_name("state_mediator.pth")
    before = snapshot(tmp_path)
    line = error_of(capsys, "mediator", toy_root, tmp_path)
    assert f"{state} holds the state of an interrupted run: pass --resume to continue it, or --overwrite" in line
    line = error_of(capsys, "mediator", toy_root, tmp_path, resume=True, lr=0.01)
    assert f"{state} was saved by a run with other settings (mediator.lr: artifact has 0.001, this run has 0.01)" \
        in line
    assert snapshot(tmp_path) == before
    state.write_bytes(state.read_bytes()[:100])
    before = snapshot(tmp_path)
    line = error_of(capsys, "mediator", toy_root, tmp_path, resume=True)
    assert f"resume state {state} is not a readable PyTorch file" in line
    assert snapshot(tmp_path) == before
    state.unlink()
    line = error_of(capsys, "mediator", toy_root, tmp_path, resume=True)
    assert f"resume state not found: {state}" in line


# --- non-finite losses ------------------------------------------------------------------------------

def nan_on_calls(calls: set[int] | range):
    """modularity_loss that returns NaN on the given (1-based) calls."""
    counter = itertools.count(1)

    def loss(*args, **kwargs):
        value = modularity_loss(*args, **kwargs)
        return value * float("nan") if next(counter) in calls else value
    return loss


def test_a_non_finite_loss_is_skipped_and_counted(toy_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("stages.mediator.modularity_loss", nan_on_calls({2}))
    run("mediator", toy_root, tmp_path, max_steps=3)
    assert "warning: 1 step(s) skipped because the loss was not finite" in capsys.readouterr().out
    assert np.isfinite(np.load(codebook(tmp_path))).all()


def test_non_finite_losses_in_a_row_stop_and_keep_the_last_good_state(toy_root, tmp_path, capsys, monkeypatch):
    run("mediator", toy_root, tmp_path / "one_step", max_steps=1)
    monkeypatch.setattr("stages.mediator.modularity_loss", nan_on_calls(range(2, 100)))
    line = error_of(capsys, "mediator", toy_root, tmp_path, max_steps=10, max_nonfinite=3)
    state = codebook(tmp_path).with_name("state_mediator.pth")
    assert "mediator: the loss was not finite for 3 steps in a row (epoch 1, step 4)" in line
    assert f"the last good state is kept in {state}" in line
    assert not codebook(tmp_path).exists()
    kept = torch.load(state, weights_only=False)["stateful"]["cluster"]["codebook"]
    assert torch.equal(kept, torch.from_numpy(np.load(codebook(tmp_path / "one_step"))))
