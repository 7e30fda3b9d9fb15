"""What the default `bash run` learns on the toy set: CAUSE-TR after all three stages against the
same pipeline with untrained heads and probe (`--max_steps 0` in stages 2 and 3)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from loader.datasets_table import run_defaults
from tests.conftest import cli
from stages.evaluate import evaluate
from stages.fine_tuning import fine_tune
from stages.front_door import train_front_door
from stages.mediator import train_mediator
from tests.conftest import TOY_CKPT, toy_flags

pytestmark = pytest.mark.slow
RUN = Path(__file__).resolve().parents[1] / "run"
MARGIN = 15.0  # mIoU points; measured at the defaults: 64.4 vs 38.0 (README, "Toy numbers")


def run_toy_defaults() -> dict[str, int]:
    """num_codebook, projection_dim and batch_size of `bash run` on its default, the toy set (`run` reads them
    from the dataset table; tests/test_reproduce.py checks that it does)."""
    text = RUN.read_text()
    assert re.search(r'dataset="\$\{dataset:-toy\}"', text) and re.search(r'structure="\$\{structure:-TR\}"', text)
    assert f'ckpt="${{ckpt:-checkpoint/{TOY_CKPT}.pth}}"' in text
    return run_defaults("toy")


def pipeline_miou(root: Path, out: Path, steps: int | None) -> float:
    """Stages 1-3 and the test as `bash run` runs them; `steps` caps stages 2 and 3 (None: full)."""
    flags = {**run_toy_defaults(), "max_steps": None, "save_images": 0}
    cli("mediator", None, train_mediator, toy_flags(root, out, **flags))  # a copied codebook is reused
    training = {**flags, "max_steps": steps, "validate": "false"}  # per-epoch scores change no weight: skipped
    cli("front_door_tr", "TR", train_front_door, toy_flags(root, out, **training))
    cli("fine_tuning_tr", "TR", fine_tune, toy_flags(root, out, **training))
    cli("test_tr", "TR", evaluate, toy_flags(root, out, **flags))
    folder = out / "results" / "toy" / "TR" / TOY_CKPT / str(flags["num_codebook"])
    return json.loads((folder / "metrics.json").read_text())["unsupervised"]["mIoU"]


def test_trained_pipeline_is_far_above_untrained_heads_and_probe(toy_root: Path, tmp_path: Path) -> None:
    trained = pipeline_miou(toy_root, tmp_path / "trained", None)
    # stage 1 is the same in both pipelines (same seed and flags): the untrained one starts from its copy
    stage1 = Path("CAUSE") / "toy" / "modularity"
    shutil.copytree(tmp_path / "trained" / stage1, tmp_path / "untrained" / stage1)
    untrained = pipeline_miou(toy_root, tmp_path / "untrained", 0)
    assert trained >= untrained + MARGIN, (trained, untrained)
