"""Two Gloo processes on CPU: one set of artifacts, the same bank and EMA on every rank, and a failing
rank that makes every rank exit non-zero in bounded time."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loader.sampler import EpochSampler
from loader.toy import ensure_toy
from tests.conftest import toy_flags

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
K = 32
DEADLINE_S = 120  # far below --dist_timeout: a rank waiting on a dead peer must not sit out the timeout

# Runs a stage under torchrun and, after training, saves what every rank holds (modules, bank).
DUMPING_STAGE = """
import sys, torch
from stages import trainer
from tests.conftest import cli
from stages.front_door import train_front_door

fit = trainer.Trainer.fit

def fit_and_dump(self, *args, **kwargs):
    fit(self, *args, **kwargs)
    torch.save({k: v.state_dict() for k, v in self.stateful.items() if k != "bank_rng"},
               f"{sys.argv[1]}/rank{self.run.dist.rank}.pt")

trainer.Trainer.fit = fit_and_dump
cli("front_door_tr", "TR", train_front_door, argv=sys.argv[2:])
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def torchrun(script: list[str], timeout: float = DEADLINE_S) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def ddp_codebook(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mediator trained by `torchrun --nproc_per_node 2 train_mediator.py ... --device cpu`."""
    out = tmp_path_factory.mktemp("ddp")
    done = torchrun(["train_mediator.py", *toy_flags(toy_root, out, "mediator", max_steps=3)])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_ddp_mediator_writes_exactly_one_set_of_artifacts(ddp_codebook: Path):
    folder = "toy/modularity/random_vit_tiny_8/32"
    assert files(ddp_codebook / "CAUSE") == {f"{folder}/modular.npy", f"{folder}/modular.json"}
    assert len(files(ddp_codebook / "logs")) == 1  # one TensorBoard file, from rank 0
    assert np.isfinite(np.load(ddp_codebook / "CAUSE" / folder / "modular.npy")).all()


def test_ddp_front_door_ranks_agree_on_weights_ema_and_bank(ddp_codebook: Path, toy_root: Path, tmp_path: Path):
    script = tmp_path / "dumping_stage.py"
    script.write_text(DUMPING_STAGE)
    done = torchrun([str(script), str(tmp_path), *toy_flags(toy_root, ddp_codebook, epoch=1, max_steps=3)])
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for group in ("segment", "bank"):
        assert rank0[group].keys() == rank1[group].keys()
        for key, value in rank0[group].items():
            assert torch.equal(value, rank1[group][key]), f"{group}.{key} differs between ranks"
    assert rank0["bank"]["fill"].sum() > 0  # the bank was filled, from both ranks' patches
    assert any(not torch.equal(rank0["segment"][k], rank0["segment"][k.replace("head_ema.", "head.", 1)])
               for k in rank0["segment"] if k.startswith("head_ema.") and k.endswith("weight"))
    saved = torch.load(ddp_codebook / "CAUSE/toy/random_vit_tiny_8/32/segment_tr.pth")
    assert all(torch.equal(saved[k], v) for k, v in rank0["segment"].items())
    assert not list(ddp_codebook.rglob("state_*.pth")) and not list(ddp_codebook.rglob("*.tmp"))


def test_ctrl_c_under_torchrun_saves_once_prints_the_launcher_command_and_exits_130(toy_root: Path, tmp_path: Path):
    """Ctrl-C reaches the launcher and both ranks (one process group): rank 0 alone prints the resume line,
    naming the launcher's command (`python -m utils.distributed`, torchrun's flags), which resumes the run."""
    flags = toy_flags(toy_root, tmp_path, "mediator", epoch=2, max_steps=3, batch_size=2, train_resolution=64)
    launcher = [sys.executable, "-m", "utils.distributed", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen([*launcher, "train_mediator.py", *flags], cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    seen = b""
    while b"epoch 1/2" not in seen:  # rank 0's first bar: training has started
        chunk = proc.stderr.read1(4096)
        assert chunk, seen.decode()[-3000:]
        seen += chunk
    os.killpg(proc.pid, signal.SIGINT)
    err = (seen + proc.stderr.read()).decode()
    assert proc.wait(timeout=DEADLINE_S) == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, err[-3000:]
    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command == [*launcher, "train_mediator.py", *flags, "--resume"]
    resumed = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=DEADLINE_S)
    assert resumed.returncode == 0 and "resumed mediator from" in resumed.stdout, resumed.stderr[-3000:]
    assert files(tmp_path / "CAUSE") == {f"toy/modularity/random_vit_tiny_8/{K}/modular.npy",
                                         f"toy/modularity/random_vit_tiny_8/{K}/modular.json"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_failing_rank_stops_every_rank(failing_rank: int, toy_root: Path, tmp_path: Path):
    """Two ranks started by hand (no torchrun to kill the survivor); a corrupt image in one rank's shard."""
    data = tmp_path / "data"
    shutil.copytree(ensure_toy(toy_root / "data"), data / "toy")
    ids = (data / "toy" / "train.txt").read_text().split()
    first = EpochSampler(len(ids), seed=0, epoch=0, rank=failing_rank, world_size=2).indices()[0]
    bad = data / "toy" / "images" / "train" / f"{ids[first]}.png"
    bad.write_bytes(b"not a png")
    port = str(free_port())
    argv = [sys.executable, "train_mediator.py", *toy_flags(toy_root, tmp_path, "mediator", data_dir=data,
                                                             max_steps=3)]
    start = time.monotonic()
    procs = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in (0, 1)]
    try:
        results = [p.communicate(timeout=DEADLINE_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - start < DEADLINE_S
    assert all(p.returncode != 0 for p in procs), [p.returncode for p in procs]
    assert f"error (rank {failing_rank}): cannot read image {bad}" in results[failing_rank][1]
    assert files(tmp_path / "CAUSE") == set()
