"""Loader workers (loader/workers.py): they ignore the stop signals from their first instruction, the exit hook
kills them and no other process, and the cropping loader's workers are of the same kind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data._utils import worker as torch_worker

from loader import cropping
from loader.workers import worker_loader
from tests.test_datasets import make_cityscapes
from utils.errors import STOP_SIGNALS, UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("user_pool", [False, True])
def test_the_exit_does_not_hang(user_pool):
    """A loader left open (its workers, which ignore SIGTERM, kept alive, say, by a traceback): multiprocessing's
    exit would SIGTERM them and wait forever, so the exit hook kills them. The hook used to kill every daemonic
    child: with a user's Pool open too, its workers died under its feet and the interpreter hung at exit. Only
    our loader's workers are killed now; the user's Pool is left to multiprocessing's own exit."""
    pool = "pool = multiprocessing.Pool(2)\nprint(pool.map(abs, [-1, -2]), flush=True)\n" if user_pool else ""
    script = ("import multiprocessing, torch\n"
              "from loader.sampler import make_loader\n"
              f"{pool}"
              "data = torch.utils.data.TensorDataset(torch.arange(64.0))\n"
              "batches = iter(make_loader(data, 2, 2, torch.device('cpu')))\n"
              "next(batches)\n"
              "print('one batch', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=30)
    expected = ("[1, 2]\n" if user_pool else "") + "one batch\n"
    assert done.returncode == 0 and done.stdout == expected, done.stderr[-2000:]
    assert "Error" not in done.stderr, done.stderr[-2000:]   # no worker death reported by torch at exit


def _signal_state() -> tuple[set[int], list[bool]]:
    """(the stop signals blocked in this process now, whether each is ignored)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return {int(s) for s in blocked} & {int(s) for s in STOP_SIGNALS}, \
        [signal.getsignal(s) is signal.SIG_IGN for s in STOP_SIGNALS]


class _SignalReport(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> torch.Tensor:
        blocked, ignored = _signal_state()
        return torch.tensor([len(blocked), *ignored])


def test_workers_ignore_stop_signals_from_their_first_instruction(monkeypatch, tmp_path):
    """A worker starts with SIGINT and SIGTERM blocked (no gap before its init, which ignores them and unblocks
    them); the main process gets its mask back."""
    first = tmp_path / "first"
    loop = torch_worker._worker_loop

    def recording_loop(*args, **kwargs):   # the worker's first Python instruction (fork start method)
        blocked, ignored = _signal_state()
        first.write_text(f"{len(blocked)} {sum(ignored)}")
        return loop(*args, **kwargs)

    monkeypatch.setattr(torch_worker, "_worker_loop", recording_loop)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    batches = [b.tolist() for b in worker_loader(_SignalReport(), 1, batch_size=None)]
    assert first.read_text() == f"{len(STOP_SIGNALS)} 0"          # blocked, not yet ignored
    assert batches == [[0, *[1] * len(STOP_SIGNALS)]] * 2          # after the init: ignored, unblocked
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_cropping_workers_ignore_stop_signals(tmp_path, monkeypatch):
    for root in (tmp_path / "a", tmp_path / "b"):
        make_cityscapes(root, "train", {("bonn", "bonn_000000"): np.full((16, 20), 7, np.uint8)})
    write = cropping._CropWriter.__getitem__

    def checked(self, i):
        ignored = all(signal.getsignal(s) is signal.SIG_IGN for s in STOP_SIGNALS)
        return write(self, i) if ignored else (0, f"process {os.getpid()} does not ignore the stop signals")

    monkeypatch.setattr(cropping._CropWriter, "__getitem__", checked)
    assert cropping.write_cropped_set("cityscapes", tmp_path / "a", "five", num_workers=1, progress=False)[1] == 5
    with pytest.raises(UserError, match="does not ignore the stop signals"):   # the check itself, in this process
        cropping.write_cropped_set("cityscapes", tmp_path / "b", "five", num_workers=0, progress=False)


class _FailsAt(torch.utils.data.Dataset):
    """Items 0..15; item `bad` raises, as an unreadable image does."""

    def __init__(self, bad: int) -> None:
        self.bad = bad

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise OSError(f"cannot read item {i}")
        return torch.tensor(float(i))


def test_a_batch_that_raises_ends_the_workers_at_once():
    """The worker's error reaches the caller, and the workers are gone right then, not when a garbage collection
    finally drops the iterator that the traceback holds (it used to wait ~20 s on workers that ignore SIGTERM)."""
    batches = iter(worker_loader(_FailsAt(bad=5), num_workers=2, batch_size=2))
    workers = list(batches._workers)
    with pytest.raises(OSError, match="cannot read item 5"):
        for _ in batches:
            pass
    assert [w.is_alive() for w in workers] == [False, False]
