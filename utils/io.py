"""Atomic artifact writes and the provenance JSON kept beside every artifact."""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` (and parents) or fail with one line naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"output folder {path} is not writable")
    return path


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename over `path`: readers see the old or the new file, never half."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_torch(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_numpy(array: np.ndarray, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write)


def save_json(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
    atomic_write(path, write)


def load_torch(path: Path, what: str) -> Any:
    """torch.load with one clear line for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle error, ...
        raise UserError(f"{what} {path} is not a readable PyTorch file ({type(e).__name__}: {e})") from None


def load_numpy(path: Path, what: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return np.load(path)
    except Exception as e:
        raise UserError(f"{what} {path} is not a readable .npy file ({type(e).__name__}: {e})") from None


def provenance_path(artifact: Path) -> Path:
    """`segment_tr.pth` -> `segment_tr.json` (same folder)."""
    return Path(artifact).with_suffix(".json")


def code_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_provenance(artifact: Path, stage: str, settings: dict[str, Any], flags: dict[str, Any]) -> None:
    """JSON beside `artifact`: the settings later stages must agree with, all flags, code version, time."""
    save_json({
        "artifact": Path(artifact).name,
        "stage": stage,
        "settings": settings,
        "flags": flags,
        "code_version": code_version(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }, provenance_path(artifact))


def read_provenance(artifact: Path) -> dict[str, Any] | None:
    path = provenance_path(artifact)
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"provenance file {path} is unreadable ({e}); remove it or pass --overwrite") from None


def settings_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of the settings present in both that differ."""
    return [f"{k}: artifact has {recorded[k]!r}, this run has {current[k]!r}"
            for k in sorted(current) if k in recorded and recorded[k] != current[k]]


def check_provenance(artifact: Path, current: dict[str, Any], hint: str) -> None:
    """Stop when `artifact` was made with settings other than `current`."""
    recorded = read_provenance(artifact)
    if recorded is None:
        return
    diffs = settings_mismatch(recorded.get("settings", {}), current)
    if diffs:
        raise UserError(f"{artifact} was made with other settings ({'; '.join(diffs)}); {hint}")
