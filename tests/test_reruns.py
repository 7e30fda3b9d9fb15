"""Reruns never build on their own output: stage 3 always starts from the stage-2 head, and
unknown artifacts are refused for training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stages.common import cli
from stages.fine_tuning import fine_tune
from tests.conftest import toy_artifact_dir
from tests.test_continue_and_validate import copy_run
from tests.toy_fixtures import flags, train_toy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(toy_root: Path) -> Path:
    return train_toy(toy_root)


def test_stage3_reruns_start_from_the_stage2_head(trained: Path, toy_root: Path, tmp_path: Path):
    out = copy_run(trained, tmp_path)
    folder = toy_artifact_dir(out)
    first = torch.load(folder / "segment_tr.pth")
    for _ in range(2):  # same seed and flags as the first run: the same head every time
        cli("fine_tuning_tr", "TR", fine_tune, flags(toy_root, out, epoch=1) + ["--overwrite"])
        again = torch.load(folder / "segment_tr.pth")
        assert all(torch.equal(first[k], again[k]) for k in first)
    kept = folder / "segment_tr.front_door.pth"
    record = json.loads((folder / "segment_tr.json").read_text())
    assert record["upstream"]["front_door_segment"]["path"] == str(kept.resolve())
    assert json.loads(kept.with_suffix(".json").read_text())["stage"] == "front_door_tr"


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
