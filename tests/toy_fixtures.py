"""A tiny trained toy model shared by the evaluation and inference tests, and published-layout files."""
from __future__ import annotations

from pathlib import Path

import torch

from loader.toy import TOY_CLASSES
from tests.conftest import cli
from stages.fine_tuning import fine_tune
from stages.front_door import train_front_door
from stages.mediator import train_mediator
from tests.conftest import TOY_CKPT as CKPT
from tests.conftest import TOY_K as K
from tests.conftest import toy_artifact_dir as artifact_dir  # noqa: F401  (re-exported for the tests)
from tests.conftest import toy_flags

P, R, D, RES = 32, 90, 192, 64   # projection, reduced dim, width, resolution
C = len(TOY_CLASSES)             # classes
TINY = {"num_codebook": K, "projection_dim": P, "train_resolution": RES, "test_resolution": RES}


def flags(root: Path, out: Path, **overrides: object) -> list[str]:
    """toy_flags at the tiny resolution of these tests."""
    return toy_flags(root, out, **{**TINY, **overrides})


def results_dir(out: Path, structure: str = "TR", dataset: str = "toy") -> Path:
    return out / "results" / dataset / structure / CKPT / str(K)


def train_toy(root: Path) -> Path:
    """Mediator, TR front door and TR fine-tuning (2 steps each) under root/trained_tr.

    Calling it again is cheap: each stage finds its artifact made with the same settings and skips."""
    out = root / "trained_tr"
    cli("mediator", None, train_mediator, flags(root, out))
    cli("front_door_tr", "TR", train_front_door, flags(root, out, epoch=1))
    cli("fine_tuning_tr", "TR", fine_tune, flags(root, out, epoch=1))
    return out


def save_published(state: dict[str, torch.Tensor], path: Path) -> None:
    """A plain state dict as the published scripts save it (no provenance JSON beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
