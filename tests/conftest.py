"""Shared fixtures: a toy dataset and a random-init backbone written once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from models import save_random_checkpoint


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `data/` (the toy set is generated there on first use) and `random_vit_tiny_8.pth`."""
    root = tmp_path_factory.mktemp("toy")
    save_random_checkpoint("random_vit_tiny_8", root / "random_vit_tiny_8.pth")
    return root


def toy_flags(root: Path, out: Path, **overrides: object) -> list[str]:
    """Flags of a tiny toy run writing under `out`."""
    flags = {"dataset": "toy", "data_dir": root / "data", "ckpt": root / "random_vit_tiny_8.pth",
             "output_dir": out / "CAUSE", "results_dir": out / "results", "log_dir": out / "logs",
             "num_codebook": 32, "projection_dim": 32, "batch_size": 8, "device": "cpu", "num_workers": 0,
             "max_steps": 2, "crf_workers": 0}
    flags.update(overrides)
    argv: list[str] = []
    for k, v in flags.items():
        if v is not None:
            argv += [f"--{k}", str(v)]
    return argv
