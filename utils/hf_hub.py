"""Hugging Face model ids (`facebook/dinov2-small`, optionally `facebook/dinov2-small@<revision>`) resolved to
the snapshot folder `huggingface_hub` keeps in its cache.

The cache first (no network when the files are there); with `HF_HUB_OFFLINE=1` only the cache; otherwise a
download of `config.json` and `model.safetensors` with the user's token (`HF_TOKEN` or `huggingface-cli
login`; DINOv3 is gated). The cache folder follows `HF_HUB_CACHE`, else `HF_HOME/hub`, read when called.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError

FILES = ("config.json", "model.safetensors")
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
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


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
    kwargs = {"repo_id": repo, "revision": revision, "cache_dir": cache, "allow_patterns": list(FILES)}
    try:
        folder = snapshot_download(**kwargs, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError):
        if is_offline:
            raise UserError(f"{model_id}: no such file or folder, and not in the Hugging Face cache {cache} "
                            "(HF_HUB_OFFLINE=1): run once online (or unset HF_HUB_OFFLINE), or pass the model folder"
                            ) from None
        try:
            folder = snapshot_download(**kwargs)
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
    path = Path(folder)
    return HubModel(repo_id=repo, revision=path.name, folder=path)


def weights_file(ckpt: str | os.PathLike) -> Path:
    """The file whose sha256 identifies backbone `ckpt` in provenance records: a checkpoint file itself, the
    `model.safetensors` of a model folder, or of a Hugging Face id's snapshot."""
    path = resolve_hub_id(str(ckpt)).folder if is_hub_id(ckpt) else Path(ckpt)
    return path / FILES[1] if path.is_dir() else path
