"""The toy pipeline with the tiny random register-style backbone (stages 1 and 2 in process, a few steps per
stage), and `bash run`'s refusal of a missing real backbone. `bash run` end to end on the tiny random
DINOv3-style backbone, writing it itself: tests/test_run_continue.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import numpy as np

from models import save_random_checkpoint
from tests.conftest import cli
from stages.front_door import train_front_door
from stages.mediator import train_mediator
from tests.conftest import TOY_K, toy_flags

pytestmark = pytest.mark.slow
RUN = Path(__file__).resolve().parents[1] / "run"


def test_stages_with_the_toy_register_backbone(toy_root: Path, tmp_path: Path) -> None:
    name = "random_dinov2_vit_tiny_14_reg4"
    ckpt = tmp_path / f"{name}.pth"
    save_random_checkpoint(name, ckpt)
    flags = toy_flags(toy_root, tmp_path, ckpt=ckpt)
    cli("mediator", None, train_mediator, argv=flags)
    cli("front_door_tr", "TR", train_front_door, argv=flags)
    codebook = np.load(tmp_path / "CAUSE" / "toy" / "modularity" / name / str(TOY_K) / "modular.npy")
    assert codebook.shape == (TOY_K, 192) and np.isfinite(codebook).all()
    meta = json.loads((tmp_path / "CAUSE" / "toy" / name / str(TOY_K) / "segment_tr.json").read_text())
    assert meta["settings"]["backbone"] == name


def test_bash_run_refuses_a_missing_real_backbone(tmp_path: Path) -> None:
    """A real name is never filled with random weights: one line saying where to put the download."""
    ckpt = tmp_path / "dinov3_vit_base_16.pth"
    env = os.environ | {"PYTHON": sys.executable, "ckpt": str(ckpt)}
    done = subprocess.run(["bash", str(RUN)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and not ckpt.exists()
    assert done.stderr.strip().splitlines() == [
        f"error: backbone checkpoint {ckpt} not found. Download the official file (see "
        f"docs/backbones.md) and put it at {ckpt} (a file, or a Hugging Face model folder)"]
