"""benchmarks/gpu_check.sh --dry-run: every check of the first GPU run, at tiny sizes on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check_and_prints_one_table(tmp_path):
    log = tmp_path / "gpu_check.log"
    env = {**os.environ, "PYTHON": sys.executable, "log": str(log)}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("GPU check on: no GPU (CPU)"):].splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| check")]
    assert len(rows) == 5 and all("| ok |" in row for row in rows), table
    text = log.read_text()
    assert "| fp32 | yes |" in text and "bit for bit | yes |" in text  # the cached toy row equals the plain one
    assert "| vit_tiny_8 | fine_tuning_tr |" in text  # bench_step and bench_feature_cache rows
    assert "| predict |" in text


def test_gpu_check_refuses_an_unknown_option():
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--fast"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.strip() == "error: unknown option --fast; expected nothing or --dry-run"
