"""Hugging Face model ids (`facebook/dinov2-small`, optionally `facebook/dinov2-small@<revision>`) resolved to
the snapshot folder `huggingface_hub` keeps in its cache, and the weight files of a model folder.

The cache first (no network when the files are there); with `HF_HUB_OFFLINE=1` only the cache; otherwise a
download of `config.json` and the weights with the user's token (`HF_TOKEN` or `huggingface-cli login`;
DINOv3 is gated): safetensors (one file, or shards named by `model.safetensors.index.json`), else
`pytorch_model.bin` (one file or shards). The cache folder is huggingface_hub's own setting
(`huggingface_hub.constants.HF_HUB_CACHE`: `HF_HUB_CACHE`, the legacy `HUGGINGFACE_HUB_CACHE`, else
`HF_HOME/hub`, as the library read them when imported).
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

CONFIG = "config.json"
# transformers' order of preference: safetensors (one file or shards) before pytorch_model.bin
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_PATTERNS = ("model*.safetensors*", "pytorch_model*.bin*")   # the file, its index and its shards
_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*?)(?:@(?P<revision>[\w./-]+))?$")
_FILE_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".safetensors", ".npy")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    revision: str   # the snapshot's commit hash
    folder: Path

    @property
    def artifact_name(self) -> str:
        """How artifact paths and provenance name the model: `facebook--dinov2-small@<12 hex of the revision>`."""
        return f"{self.repo_id.replace('/', '--')}@{self.revision[:12]}"


def is_hub_id(ckpt: str | os.PathLike) -> bool:
    """`owner/name[@revision]` that is no existing path and no checkpoint file name."""
    text = str(ckpt)
    return (_ID.match(text) is not None and not text.lower().endswith(_FILE_SUFFIXES)
            and not Path(text).exists())


def hub_cache_dir() -> Path:
    """The cache folder huggingface_hub uses (its constants: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def weights_source(folder: Path) -> Path | None:
    """The file that names a model folder's weights: `model.safetensors` or its shards' index, else
    `pytorch_model.bin` or its index; None when the folder has none of them."""
    for name in WEIGHTS:
        for candidate in (folder / name, folder / f"{name}.index.json"):
            if candidate.is_file():
                return candidate
    return None


def weight_files(source: Path) -> list[Path]:
    """The files holding the weights: `source` itself, or the shards its index names (each must be there)."""
    if not source.name.endswith(".index.json"):
        return [source]
    try:
        weight_map = json.loads(source.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{source}: not a readable shard index (expected a JSON object with a weight_map): "
                        f"{type(e).__name__}: {e}") from None
    missing = [name for name in shards if not (source.parent / name).is_file()]
    if missing:
        raise UserError(f"{source}: names {len(shards)} shards, {len(missing)} missing: {', '.join(missing[:3])}")
    return [source.parent / name for name in shards]


def resolve_hub_id(model_id: str) -> HubModel:
    """The cached (or downloaded) snapshot of `model_id`; one line naming the id and the reason otherwise."""
    return _resolve(model_id, str(hub_cache_dir()), offline())


@functools.lru_cache(maxsize=None)
def _resolve(model_id: str, cache: str, is_offline: bool) -> HubModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    match = _ID.match(model_id)
    if match is None:
        raise UserError(f"{model_id!r}: expected a Hugging Face model id such as facebook/dinov2-small[@revision]")
    repo, revision = match["repo"], match["revision"]
    kwargs = {"repo_id": repo, "revision": revision, "cache_dir": cache}
    try:
        folder = Path(snapshot_download(**kwargs, allow_patterns=[CONFIG, *WEIGHT_PATTERNS], local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        folder = None
    if folder is None or not (folder / CONFIG).is_file() or weights_source(folder) is None:
        if is_offline:
            raise UserError(f"{model_id}: no such file or folder, and not in the Hugging Face cache {cache} with "
                            f"{CONFIG} and its weights (HF_HUB_OFFLINE=1): run once online (or unset HF_HUB_OFFLINE), "
                            f"or pass the model folder") from None
        try:
            for pattern in WEIGHT_PATTERNS:   # the .bin files only where the model has no safetensors
                folder = Path(snapshot_download(**kwargs, allow_patterns=[CONFIG, pattern]))
                if weights_source(folder) is not None:
                    break
        except GatedRepoError:
            raise UserError(f"{model_id}: gated model: accept its licence at https://huggingface.co/{repo}, then "
                            "log in with `huggingface-cli login` or set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise UserError(f"{model_id}: no such file or folder, and no such Hugging Face model (or a private "
                            "one: log in with `huggingface-cli login` or set HF_TOKEN)") from None
        except RevisionNotFoundError:
            raise UserError(f"{model_id}: the model has no revision {revision!r}") from None
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{model_id}: cannot download from the Hugging Face Hub: {reason}") from None
        if weights_source(folder) is None:
            raise UserError(f"{model_id}: the model has neither {WEIGHTS[0]} (one file or shards) nor {WEIGHTS[1]}")
    return HubModel(repo_id=repo, revision=folder.name, folder=folder)


def weights_file(ckpt: str | os.PathLike) -> Path:
    """The file whose sha256 identifies backbone `ckpt` in provenance records: a checkpoint file itself, or the
    `weights_source` of a model folder or of a Hugging Face id's snapshot (for shards: their index)."""
    path = resolve_hub_id(str(ckpt)).folder if is_hub_id(ckpt) else Path(ckpt)
    return (weights_source(path) or path / WEIGHTS[0]) if path.is_dir() else path
