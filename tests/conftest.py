"""Shared fixtures: a toy dataset and a random-init backbone written once per test session."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

from models import save_random_checkpoint
from stages.cli import cli as script_cli
from utils.config import stage_argv


# decode-check records of data folders (loader/checks.py) go to a folder of this test session, not ~/.cache
os.environ["CAUSE_CACHE"] = tempfile.mkdtemp(prefix="cause-cache-")

TOY_K = 32                      # concepts of the tiny toy runs
TOY_CKPT = "random_vit_tiny_8"


def toy_artifact_dir(out: Path, dataset: str = "toy") -> Path:
    """Folder of segment_*.pth / cluster_*.pth of a tiny toy run writing under `out`."""
    return out / "CAUSE" / dataset / TOY_CKPT / str(TOY_K)


def toy_codebook_path(out: Path) -> Path:
    return out / "CAUSE" / "toy" / "modularity" / TOY_CKPT / str(TOY_K) / "modular.npy"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside, as in a subprocess started with OMP_NUM_THREADS=1 (for runs that must equal
    such a subprocess's bit for bit); the thread count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Each test starts with the session's torch thread count: a test that sets it (a benchmark's --threads)
    would otherwise leave every later test on that many threads."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `data/` (the toy set is generated there on first use) and `random_vit_tiny_8.pth`."""
    root = tmp_path_factory.mktemp("toy")
    save_random_checkpoint(TOY_CKPT, root / f"{TOY_CKPT}.pth")
    return root


def for_stage(stage: str, argv: list[str]) -> list[str]:
    """The flags of `argv` that `stage`'s script takes: toy_flags gives every stage the same set."""
    return stage_argv(stage, argv)


def cli(stage: str, structure: str | None, body: Callable, argv: list[str]) -> None:
    """stages.cli.cli on the flags of `argv` that this stage's script takes."""
    script_cli(stage, structure, body, for_stage(stage, argv))


def toy_flags(root: Path, out: Path, stage: str | None = None, **overrides: object) -> list[str]:
    """Flags of a tiny toy run writing under `out`; with `stage`, only those its script takes."""
    flags = {"dataset": "toy", "data_dir": root / "data", "ckpt": root / f"{TOY_CKPT}.pth",
             "output_dir": out / "CAUSE", "results_dir": out / "results", "log_dir": out / "logs",
             "num_codebook": TOY_K, "projection_dim": 32, "batch_size": 8, "device": "cpu", "num_workers": 0,
             "max_steps": 2, "crf_workers": 0}
    flags.update(overrides)
    argv: list[str] = []
    for k, v in flags.items():
        if v is not None:
            argv += [f"--{k}", str(v)]
    return argv if stage is None else for_stage(stage, argv)
