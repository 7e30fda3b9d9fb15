"""Reruns never build on their own output: stage 3 always starts from the stage-2 head, and
unknown artifacts are refused for training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.artifacts import OVERWRITE_HINT
from stages import fine_tuning
from tests.conftest import cli
from stages.evaluate import evaluate
from stages.fine_tuning import fine_tune
from stages.front_door import train_front_door
from stages.mediator import train_mediator
from tests.conftest import toy_artifact_dir, toy_codebook_path
from tests.test_continue_and_validate import copy_run
from tests.toy_fixtures import flags, results_dir, train_toy
from utils.errors import UserError
from utils.io import file_sha256, write_download_record

pytestmark = pytest.mark.slow
QUICK = {"epoch": 1, "max_steps": 0, "validate": "false"}


@pytest.fixture(scope="module")
def trained(toy_root: Path) -> Path:
    return train_toy(toy_root)


def test_stage3_reruns_start_from_the_stage2_head(trained: Path, toy_root: Path, tmp_path: Path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch):
    out = copy_run(trained, tmp_path)
    folder = toy_artifact_dir(out)
    heads = []
    for _ in range(2):  # the same seed and flags: the same head, whatever ran before (the leak applied once)
        cli("fine_tuning_tr", "TR", fine_tune, flags(toy_root, out, epoch=1, max_steps=1, validate="false",
                                                     published_label_leak="true") + ["--overwrite"])
        heads.append(torch.load(folder / "segment_tr.pth"))
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    kept = folder / "segment_tr.front_door.pth"
    record = json.loads((folder / "segment_tr.json").read_text())
    assert record["upstream"]["front_door_segment"]["path"] == str(kept.resolve())
    assert json.loads(kept.with_suffix(".json").read_text())["stage"] == "front_door_tr"
    # TensorBoard: a folder per run, so the two runs' curves never overlap
    runs = [p for p in (out / "logs").rglob("*") if p.is_dir() and p.parent.name == "fine_tuning_tr"]
    assert len(runs) == 2 and all(len(list(run.glob("events.out.tfevents.*"))) == 1 for run in runs)

    def fails(*args: object, **kwargs: object) -> None:
        raise UserError("the first step fails")
    monkeypatch.setattr(fine_tuning, "modularity_loss", fails)  # a run that stops before writing anything
    before = sorted((out / "logs").rglob("*"))
    refusal(capsys, "fine_tuning_tr", "TR", fine_tune, flags(toy_root, out, epoch=1, max_steps=1) + ["--overwrite"])
    assert sorted((out / "logs").rglob("*")) == before  # it left no TensorBoard file or folder


def test_stage3_refuses_a_head_without_provenance(trained: Path, toy_root: Path, tmp_path: Path, capsys):
    out = copy_run(trained, tmp_path)
    folder = toy_artifact_dir(out)
    for name in ("segment_tr.json", "segment_tr.front_door.pth", "segment_tr.front_door.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(SystemExit) as stop:
        cli("fine_tuning_tr", "TR", fine_tune, flags(toy_root, out, epoch=1) + ["--overwrite"])
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: {folder / 'segment_tr.pth'} has no provenance JSON")
    assert "train_front_door_tr.py" in line


def refusal(capsys: pytest.CaptureFixture, stage: str, structure: str | None, fn, argv: list[str]) -> str:
    """The one `error:` line of a stage that must stop (exit 2)."""
    with pytest.raises(SystemExit) as stop:
        cli(stage, structure, fn, argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_artifacts_that_cannot_be_checked_are_refused_for_training(trained: Path, toy_root: Path, tmp_path: Path,
                                                                   capsys):
    out = copy_run(trained, tmp_path)
    codebook = toy_codebook_path(out)
    record = json.loads(codebook.with_suffix(".json").read_text())
    del record["settings"]["published_recipe"]  # a JSON made before the setting was recorded
    codebook.with_suffix(".json").write_text(json.dumps(record))
    line = refusal(capsys, "front_door_tr", "TR", train_front_door, flags(toy_root, out, **QUICK) + ["--overwrite"])
    assert line.startswith("error: modular.json records no published_recipe (made by an older version)")
    assert "python train_mediator.py" in line
    line = refusal(capsys, "mediator", None, train_mediator, flags(toy_root, out))
    assert "already exists and was made with other settings (published_recipe: artifact records none" in line

    codebook.with_suffix(".json").unlink()  # neither ours nor a download: unknown
    line = refusal(capsys, "front_door_tr", "TR", train_front_door, flags(toy_root, out, **QUICK) + ["--overwrite"])
    assert line.startswith(f"error: {codebook} has no provenance JSON and no download record")
    line = refusal(capsys, "mediator", None, train_mediator, flags(toy_root, out))
    assert line == f"error: {codebook} already exists without a provenance JSON (made elsewhere); {OVERWRITE_HINT}"

    write_download_record(codebook, {"published": "toy"})  # what download.py writes: a published codebook
    cli("front_door_tr", "TR", train_front_door, flags(toy_root, out, **QUICK) + ["--overwrite"])
    assert f"note: {codebook} is a published download (modular.download.json)" in capsys.readouterr().out


def test_results_folder_holds_one_models_outputs(trained: Path, toy_root: Path, tmp_path: Path, capsys):
    out = copy_run(trained, tmp_path)
    folder, results = toy_artifact_dir(out), results_dir(out)
    cli("test_tr", "TR", evaluate, flags(toy_root, out, save_images=2))
    cli("test_tr", "TR", evaluate, flags(toy_root, out, save_images=1))  # the same model: recomputed in place
    assert sorted(p.name for p in (results / "panels").iterdir()) == ["panels_0.png"]
    assert "recomputing the results of this same model and settings" in capsys.readouterr().out

    cli("fine_tuning_tr", "TR", fine_tune, flags(toy_root, out, lr=0.01, **QUICK) + ["--overwrite"])  # retrained
    before = (results / "metrics.json").read_bytes()
    line = refusal(capsys, "test_tr", "TR", evaluate, flags(toy_root, out, save_images=1))
    assert line.startswith(f"error: {results} holds the results of another model or settings (")
    assert f"cluster {(folder / 'cluster_tr.pth').resolve()}: sha256 recorded" in line
    assert "pass --overwrite to replace them" in line and (results / "metrics.json").read_bytes() == before

    for name in ("segment_tr", "cluster_tr"):  # files that cannot be checked are named, in one line each
        (folder / f"{name}.json").unlink()
    write_download_record(folder / "cluster_tr.pth", {"published": "toy"})
    cli("test_tr", "TR", evaluate, flags(toy_root, out, save_images=0) + ["--overwrite"])
    shown = capsys.readouterr().out
    assert f"unchecked: {folder / 'segment_tr.pth'} has no provenance JSON and no download record" in shown
    assert f"note: {folder / 'cluster_tr.pth'} is a published download" in shown
    assert not (results / "panels").exists()  # the earlier model's pictures are gone
    record = json.loads((results / "metrics.json").read_text())
    assert record["upstream"]["cluster"]["sha256"] == file_sha256(folder / "cluster_tr.pth")
    line = refusal(capsys, "test_tr", "TR", evaluate, flags(toy_root, out, save_images=0, precision="fp32"))
    assert "precision: recorded 'auto', this run has 'fp32'" in line
