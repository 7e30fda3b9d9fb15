"""--load_segment / --load_cluster continue from the existing head / probe; per-epoch validation
(--validate, --val_images) is printed and logged."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stages import validation
from tests.conftest import cli
from stages.fine_tuning import fine_tune
from stages.front_door import train_front_door
from tests.conftest import toy_artifact_dir
from tests.toy_fixtures import flags, train_toy

pytestmark = pytest.mark.slow
QUIET = {"epoch": 1, "validate": "false"}


@pytest.fixture(scope="module")
def trained(toy_root: Path) -> Path:
    return train_toy(toy_root)


def copy_run(src: Path, dst: Path) -> Path:
    for f in src.rglob("*"):
        if f.is_file() and "CAUSE" in f.parts:
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    return dst


def test_load_segment_continues_from_the_existing_head(trained: Path, toy_root: Path, tmp_path: Path, capsys):
    out = copy_run(trained, tmp_path)
    before = torch.load(toy_artifact_dir(out) / "segment_tr.front_door.pth")  # the stage-2 head, not stage 3's
    with pytest.raises(SystemExit):  # it replaces the file: only with --overwrite
        cli("front_door_tr", "TR", train_front_door, flags(toy_root, out, load_segment="true", **QUIET))
    assert "front_door_tr.load_segment: artifact has False, this run has True" in capsys.readouterr().err
    # zero steps from the loaded head give the loaded head; without --load_segment, a fresh one
    for load, same in (("true", True), ("false", False)):
        cli("front_door_tr", "TR", train_front_door,
            flags(toy_root, out, load_segment=load, max_steps=0, **QUIET) + ["--overwrite"])
        after = torch.load(toy_artifact_dir(out) / "segment_tr.pth")
        assert all(torch.equal(before[k], after[k]) for k in before) == same
        if load == "true":
            assert "continuing from the segment head" in capsys.readouterr().out


def test_load_cluster_continues_from_the_existing_probe(trained: Path, toy_root: Path, tmp_path: Path, capsys):
    out = copy_run(trained, tmp_path)
    before = torch.load(toy_artifact_dir(out) / "cluster_tr.pth")
    for load, same in (("true", True), ("false", False)):
        cli("fine_tuning_tr", "TR", fine_tune,
            flags(toy_root, out, load_cluster=load, max_steps=0, **QUIET) + ["--overwrite"])
        after = torch.load(toy_artifact_dir(out) / "cluster_tr.pth")
        assert torch.equal(before["cluster_probe"], after["cluster_probe"]) == same
        assert torch.equal(before["codebook"], after["codebook"])


def test_load_flags_refused_where_they_cannot_work(trained: Path, toy_root: Path, tmp_path: Path, capsys):
    out = copy_run(trained, tmp_path)
    for name in ("segment_tr", "cluster_tr"):
        (toy_artifact_dir(out) / f"{name}.pth").unlink()
    with pytest.raises(SystemExit) as e:  # a codebook but no head to continue from
        cli("front_door_tr", "TR", train_front_door, flags(toy_root, out, load_segment="true", **QUIET))
    assert e.value.code == 2 and "--load_segment true continues the segment head" in capsys.readouterr().err
    out = copy_run(trained, tmp_path / "again")
    with pytest.raises(SystemExit) as e:
        cli("fine_tuning_tr", "TR", fine_tune, flags(toy_root, out, load_segment="false", **QUIET))
    assert e.value.code == 2 and "--load_segment false" in capsys.readouterr().err


def test_validation_after_every_epoch(trained: Path, toy_root: Path, tmp_path: Path, capsys,
                                      monkeypatch: pytest.MonkeyPatch):
    seen: list[int] = []
    make_loader = validation.make_loader
    monkeypatch.setattr(validation, "make_loader",
                        lambda ds, *a, **k: (seen.append(len(ds)), make_loader(ds, *a, **k))[1])
    out = copy_run(trained, tmp_path)
    cli("fine_tuning_tr", "TR", fine_tune,
        flags(toy_root, out, epoch=2, max_steps=1, val_images=5) + ["--overwrite"])
    printed = [line for line in capsys.readouterr().out.splitlines() if "validation after epoch" in line]
    assert len(printed) == 2 and seen == [5, 5]
    for key in ("linear_acc", "linear_mIoU", "cluster_acc", "cluster_mIoU"):
        assert key in printed[0]
    events = EventAccumulator(str(next(next((out / "logs").rglob("fine_tuning_tr")).iterdir()))).Reload()  # the one run
    assert {"fine_tuning_tr/val/cluster_mIoU", "fine_tuning_tr/val/linear_acc"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("fine_tuning_tr/val/cluster_mIoU")] == [1, 2]
    # stage 2 scores the linear probe only; --validate false scores nothing
    seen.clear()
    cli("front_door_tr", "TR", train_front_door, flags(toy_root, out, epoch=1, max_steps=1, val_images=3)
        + ["--overwrite"])
    printed = [line for line in capsys.readouterr().out.splitlines() if "validation after epoch" in line]
    assert len(printed) == 1 and "linear_mIoU" in printed[0] and "cluster" not in printed[0] and seen == [3]
    seen.clear()
    cli("front_door_tr", "TR", train_front_door, flags(toy_root, out, **QUIET) + ["--overwrite"])
    assert "validation after epoch" not in capsys.readouterr().out and seen == []
