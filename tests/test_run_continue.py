"""`bash run` interrupted during stage 2 and run again continues the pipeline to the uninterrupted result."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import cli
from tests.conftest import toy_artifact_dir, toy_codebook_path, toy_flags

pytestmark = pytest.mark.slow
RUN = Path(__file__).resolve().parents[1] / "run"
SIZES = {"epoch": 2, "max_steps": 2, "train_resolution": 64, "test_resolution": 64}


def run_env(root: Path, out: Path) -> dict[str, str]:
    extra = " ".join(f"--{k} {v}" for k, v in SIZES.items()) + (
        f" --num_workers 0 --crf_workers 0 --save_images 0 --device cpu --output_dir {out / 'CAUSE'}"
        f" --results_dir {out / 'results'} --log_dir {out / 'logs'}")
    return os.environ | {"PYTHON": sys.executable, "ckpt": str(root / "random_vit_tiny_8.pth"),
                         "data_dir": str(root / "data"), "num_codebook": "32", "projection_dim": "32",
                         "val_images": "2", "extra": extra, "OMP_NUM_THREADS": "1"}


def weights(out: Path) -> dict[str, torch.Tensor]:
    folder = toy_artifact_dir(out)
    return {f"{n}.{k}": v for n in ("segment_tr", "cluster_tr") for k, v in torch.load(folder / f"{n}.pth").items()}


def test_bash_run_interrupted_in_stage_2_continues_when_run_again(toy_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "piped"
    proc = subprocess.Popen(["bash", str(RUN)], env=run_env(toy_root, out), stdout=subprocess.PIPE,
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
    again = subprocess.run(["bash", str(RUN)], env=run_env(toy_root, out), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already exists with these settings; nothing to do" in again.stdout  # stage 1
    assert "resumed front_door_tr from" in again.stdout
    assert not list(out.rglob("state_*.pth"))

    straight = tmp_path / "straight"  # the same stages uninterrupted, in process, on one thread as `run_env`'s
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cli("mediator", None, "stages.mediator:train_mediator", toy_flags(toy_root, straight, **SIZES))
    flags = toy_flags(toy_root, straight, **SIZES, validate="false")  # validation changes no weight
    cli("front_door_tr", "TR", "stages.front_door:train_front_door", flags)
    cli("fine_tuning_tr", "TR", "stages.fine_tuning:fine_tune", flags)
    torch.set_num_threads(threads)
    np.testing.assert_array_equal(np.load(toy_codebook_path(out)), np.load(toy_codebook_path(straight)))
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
    env = run_env(toy_root, tmp_path / "out") | {"PYTHON": str(python)}
    done = subprocess.run(["bash", str(RUN)], env=env, capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert done.returncode == 130, done.stdout + done.stderr
    assert "stage 1 finished" in done.stdout and "STEP 2" not in done.stdout and "ran " not in done.stdout
    assert "[run] stopped after STEP 1 (it finished before the stop took effect); run again to go on" in done.stderr
