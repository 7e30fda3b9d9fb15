"""`bash run` reports the wall time of every step and the total (scripts replaced by a stand-in)."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "run"


def test_run_prints_each_step_time_and_the_total(tmp_path: Path):
    shutil.copy(RUN, tmp_path / "run")
    log = tmp_path / "calls"
    fake = tmp_path / "python"  # stands in for the scripts: records each, takes 0.3 s (`-m` helpers run)
    fake.write_text(f'#!/bin/bash\nif [ "$1" = -m ]; then PYTHONPATH={RUN.parent} exec {sys.executable} "$@"; fi\n'
                    f'echo "$1" >> {log}\nsleep 0.3\n')
    fake.chmod(0o755)
    out = subprocess.run(["bash", "run"], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    steps = re.findall(r"^\[run\] (STEP 1|STEP 2|STEP 3|BASELINE|TEST \(TR\)) (\d+\.\d) s$", out.stdout, re.M)
    assert [s for s, _ in steps] == ["STEP 1", "STEP 2", "STEP 3", "BASELINE", "TEST (TR)"]
    assert all(0.3 <= float(t) < 5 for _, t in steps)
    summary = re.search(r"^\[run\] wall time: (.*); total (\d+\.\d) s \(\d+ CPU cores", out.stdout, re.M)
    assert summary, out.stdout
    assert summary[1] == ", ".join(f"{s} {t} s" for s, t in steps)
    assert float(summary[2]) >= sum(float(t) for _, t in steps) - 0.1
    assert log.read_text().split()[1:] == ["train_mediator.py", "train_front_door_tr.py", "fine_tuning_tr.py",
                                           "test_kmeans.py", "test_tr.py"]  # first call writes the backbone
