"""Reading and writing the stage artifacts with their provenance checks."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.common import Run, require
from utils.errors import UserError
from utils.io import check_provenance, ensure_writable_dir, load_numpy, load_torch, read_provenance, save_numpy, \
    save_torch, settings_mismatch, write_provenance

OVERWRITE_HINT = "pass --overwrite to replace it, or use another --output_dir"


def already_done(run: Run, artifact: Path, settings: dict[str, Any]) -> bool:
    """True when this stage's artifact exists, was made with the same settings, and no --overwrite/--resume.

    An artifact made with other settings stops the run naming the differences; so does an artifact
    folder that cannot be written, before any work is done."""
    ensure_writable_dir(Path(artifact).parent)
    if run.args.overwrite or not Path(artifact).exists():
        return False
    diffs = settings_mismatch(recorded_settings(artifact), settings)
    if diffs:
        raise UserError(f"{artifact} already exists and was made with other settings "
                        f"({'; '.join(diffs)}); {OVERWRITE_HINT}")
    if run.args.resume:
        raise UserError(f"{artifact} is already complete; nothing to resume ({OVERWRITE_HINT})")
    run.log(f"{artifact} already exists with these settings; nothing to do ({OVERWRITE_HINT})")
    return True


def save_artifact(run: Run, obj: Any, artifact: Path, settings: dict[str, Any]) -> None:
    """Rank 0 writes the artifact (atomically) and its provenance JSON."""
    if not run.dist.is_main:
        return
    if isinstance(obj, np.ndarray):
        save_numpy(obj, artifact)
    else:
        save_torch(obj, artifact)
    write_provenance(artifact, run.args.stage, settings, run.flags())
    run.log(f"saved {artifact}")


def recorded_settings(artifact: Path) -> dict[str, Any]:
    """The settings in the provenance JSON beside `artifact` (empty when it has none)."""
    return (read_provenance(artifact) or {}).get("settings", {})


def load_codebook(run: Run) -> torch.Tensor:
    """The stage-1 codebook (K, D), checked against this run's backbone, dataset and K."""
    path = require(run.paths.codebook, "concept codebook (modular.npy)", "train_mediator.py")
    check_provenance(path, run.shared_settings(), "run train_mediator.py with the same flags, or pass matching flags")
    codebook = load_numpy(path, "concept codebook")
    expected = (run.args.num_codebook, run.derived.embed_dim)
    if codebook.shape != expected:
        raise UserError(f"codebook {path} has shape {codebook.shape}, expected {expected} "
                        f"(--num_codebook x backbone width)")
    return torch.from_numpy(np.asarray(codebook, dtype=np.float32)).to(run.device)


def load_state_dict_checked(module: torch.nn.Module, path: Path, what: str, how: str,
                            settings: dict[str, Any]) -> None:
    """Strict load of a segment/cluster file; a missing file, other settings or other shapes stop the run."""
    require(path, what, how)
    check_provenance(path, settings, f"run {how} with the same flags, or pass matching flags")
    state = load_torch(path, what)
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} does not hold a state dict")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"{what} {path} does not fit this model: missing keys {missing[:5]}, "
                        f"unexpected keys {unexpected[:5]} (check --reduced_dim/--projection_dim/structure)")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise UserError(f"{what} {path} has other shapes than this run expects: {wrong[:3]} "
                        f"(check the backbone, --train_resolution, --reduced_dim, --projection_dim, dataset)")
    module.load_state_dict(state, strict=True)
