"""Atomic artifact writes and the provenance JSON kept beside every artifact."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import subprocess
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


def check_writable_dir(path: Path) -> Path:
    """Stop with one line unless `path` is, or could be created as, a writable folder; creates nothing (a run
    that fails later leaves no empty folders behind)."""
    path = Path(path)
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create output folder {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output folder {path} is not writable" if existing == path.absolute()
                        else f"cannot create output folder {path}: {existing} is not writable")
    return path


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_temp_file(path: Path) -> str:
    """An empty `.<name>.<random>.tmp` beside `path`, created as open() creates files: mode 0666
    less the umask (mkstemp would make it 0600, and the rename would keep that)."""
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename over `path`: readers see the old or the new file, never half.

    The file gets the mode any new file gets under the umask (0644 under umask 022)."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp = _new_temp_file(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_torch(obj: Any, path: Path) -> None:
    """torch.save through a file object: the archive inside is named "archive", not after the random temp
    file, so equal objects give equal bytes wherever and whenever they are written."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    atomic_write(path, write)


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


_SHA256_CACHE: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes; remembered per (path, inode, size, mtime) so a run hashes each file once."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def file_record(path: Path) -> dict[str, str]:
    """How a provenance JSON names a file it was made from: resolved path and sha256."""
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def write_provenance(artifact: Path, stage: str, settings: dict[str, Any], flags: dict[str, Any],
                     upstream: dict[str, dict[str, str]], data: dict[str, Any] | None = None) -> None:
    """JSON beside `artifact`: the settings later stages must agree with, the artifact's own sha256, the
    path and sha256 of every file it was made from (`upstream`, by role), all flags, code version, time,
    and `data` (e.g. the images left out as unusable), which no check compares."""
    save_json({
        "artifact": Path(artifact).name,
        "sha256": file_sha256(artifact),
        "stage": stage,
        "settings": settings,
        "upstream": upstream,
        "flags": flags,
        "code_version": code_version(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        **(data or {}),
    }, provenance_path(artifact))


def read_json(path: Path, what: str) -> dict[str, Any] | None:
    """The JSON object in `path` (None when there is no such file); unreadable -> one line naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {path} is unreadable ({e}); remove it or pass --overwrite") from None


def read_provenance(artifact: Path) -> dict[str, Any] | None:
    """The provenance JSON beside `artifact` (None when it has none); it must describe the file beside it."""
    path = provenance_path(artifact)
    record = read_json(path, "provenance file")
    if record is None:
        return None
    if Path(artifact).is_file() and record.get("sha256") not in (None, file_sha256(artifact)):
        raise UserError(f"{path} describes another file than {artifact} (sha256 differs: the file was replaced "
                        f"after it was made); remove {path.name} if {Path(artifact).name} is a published download, "
                        f"or rebuild it with --overwrite")
    return record


def settings_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of the settings present in both that differ."""
    return [f"{k}: artifact has {recorded[k]!r}, this run has {current[k]!r}"
            for k in sorted(current) if k in recorded and recorded[k] != current[k]]


def unrecorded(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings of `current` that `recorded` lacks (an artifact made before they were recorded)."""
    return [k for k in sorted(current) if k not in recorded]


def download_record_path(artifact: Path) -> Path:
    """`segment_tr.pth` -> `segment_tr.download.json`: download.py's record of a published file it fetched."""
    return Path(artifact).with_name(f"{Path(artifact).stem}.download.json")


def write_download_record(artifact: Path, source: dict[str, Any]) -> None:
    """Record that `artifact` is the published file described by `source` (where it came from), with its sha256."""
    save_json({**source, "sha256": file_sha256(artifact),
               "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
              download_record_path(artifact))


def download_record(artifact: Path) -> dict[str, Any] | None:
    """download.py's record of `artifact` when it describes this very file (same sha256), else None."""
    record = read_json(download_record_path(artifact), "download record")
    if record is None or not Path(artifact).is_file() or record.get("sha256") != file_sha256(artifact):
        return None
    return record
