"""`bash run` interrupted during stage 2 and run again continues the pipeline to the uninterrupted result; the
run is the tiny random DINOv3-style backbone's, which `bash run` writes itself (a `random_*.pth` name)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import load_backbone
from tests.conftest import TOY_K, cli, one_thread, toy_flags

pytestmark = pytest.mark.slow
RUN = Path(__file__).resolve().parents[1] / "run"
SIZES = {"epoch": 2, "max_steps": 2, "train_resolution": 64, "test_resolution": 64}
BACKBONE = "random_dinov3_vit_tiny_16"


def run_env(root: Path, out: Path, ckpt: Path) -> dict[str, str]:
    extra = " ".join(f"--{k} {v}" for k, v in SIZES.items()) + (
        f" --num_workers 0 --crf_workers 0 --save_images 0 --device cpu --output_dir {out / 'CAUSE'}"
        f" --results_dir {out / 'results'} --log_dir {out / 'logs'}")
    return os.environ | {"PYTHON": sys.executable, "ckpt": str(ckpt),
                         "data_dir": str(root / "data"), "num_codebook": "32", "projection_dim": "32",
                         "val_images": "2", "extra": extra, "OMP_NUM_THREADS": "1"}


def codebook(out: Path) -> Path:
    return out / "CAUSE" / "toy" / "modularity" / BACKBONE / str(TOY_K) / "modular.npy"


def weights(out: Path) -> dict[str, torch.Tensor]:
    folder = out / "CAUSE" / "toy" / BACKBONE / str(TOY_K)
    return {f"{n}.{k}": v for n in ("segment_tr", "cluster_tr") for k, v in torch.load(folder / f"{n}.pth").items()}


def test_bash_run_interrupted_in_stage_2_continues_when_run_again(toy_root: Path, tmp_path: Path) -> None:
    out, ckpt = tmp_path / "piped", tmp_path / f"{BACKBONE}.pth"
    proc = subprocess.Popen(["bash", str(RUN)], env=run_env(toy_root, out, ckpt), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    seen = b""
    while b"[front_door_tr] epoch 1/2" not in seen:  # stage 2 trains; its stop lands in epoch 1 at the latest
        chunk = proc.stdout.read1(4096)
        assert chunk, seen.decode()[-3000:]
        seen += chunk
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: bash and the stage alike
    first = (seen + proc.stdout.read()).decode()
    assert proc.wait(timeout=600) == 130, first[-3000:]
    assert first.count("interrupted: the training state is saved in") == 1 and "STEP 3" not in first
    assert f"writing a randomly initialised backbone to {ckpt}" in first and load_backbone(ckpt).name == BACKBONE
    again = subprocess.run(["bash", str(RUN)], env=run_env(toy_root, out, ckpt), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already exists with these settings; nothing to do" in again.stdout  # stage 1
    assert "resumed front_door_tr from" in again.stdout and "writing a randomly" not in again.stdout
    assert not list(out.rglob("state_*.pth"))
    metrics = json.loads((out / "results" / "toy" / "TR" / BACKBONE / str(TOY_K) / "metrics.json").read_text())
    assert 0 <= metrics["unsupervised"]["mIoU"] <= 100

    straight = tmp_path / "straight"  # the same stages uninterrupted, in process, on one thread as `run_env`'s
    flags = toy_flags(toy_root, straight, ckpt=ckpt, **SIZES, validate="false")  # validation changes no weight
    with one_thread():
        cli("mediator", None, "stages.mediator:train_mediator", toy_flags(toy_root, straight, ckpt=ckpt, **SIZES))
        cli("front_door_tr", "TR", "stages.front_door:train_front_door", flags)
        cli("fine_tuning_tr", "TR", "stages.fine_tuning:fine_tune", flags)
    np.testing.assert_array_equal(np.load(codebook(out)), np.load(codebook(straight)))
    piped, reference = weights(out), weights(straight)
    assert piped.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(value, piped[key]), key


def test_bash_run_stops_after_a_stage_that_finished_despite_ctrl_c(toy_root: Path, tmp_path: Path) -> None:
    """Ctrl-C during stage 1's last step: the stage finishes and exits 0 (its artifact is whole), and `bash run`
    stops before stage 2 with 130. The stage stands in as a script that sends Ctrl-C to the whole process group
    (as a terminal does), ignores it itself, and exits 0."""
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/bash
case "$1" in
    train_mediator.py) trap '' INT; kill -INT 0; echo "stage 1 finished"; exit 0 ;;
    *.py) echo "ran $1"; exit 0 ;;
esac
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    env = run_env(toy_root, tmp_path / "out", toy_root / "random_vit_tiny_8.pth") | {"PYTHON": str(python)}
    done = subprocess.run(["bash", str(RUN)], env=env, capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert done.returncode == 130, done.stdout + done.stderr
    assert "stage 1 finished" in done.stdout and "STEP 2" not in done.stdout and "ran " not in done.stdout
    assert "[run] stopped after STEP 1 (it finished before the stop took effect); run again to go on" in done.stderr
