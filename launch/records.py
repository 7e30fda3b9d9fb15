"""What the stages recorded about the artifacts they made, read back for `status`, `table` and `run`.

Every artifact has a JSON (the provenance beside a .pth/.npy, or the test's metrics.json itself) naming the
flags that made it, the files it was made from (path and sha256), the commit (`code_version`) and, for
features read from the feature cache, `feature_cache`. A done stage is `stale` when that record does not
fit the row any more: a file it was made from has changed or is gone (a retrained stage 2 under an old
metrics.json), or it was made with other result-changing flags than the row asks for (a 128-px k-means
baseline under a 64-px row). The backbone checkpoint is not re-hashed here (it is large, and the stages
check it themselves).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from launch.rows import NOT_RESULT_FLAGS, Stage

# Flags that change how a stage runs or where it writes, not what it makes: never a reason to redo it.
NOT_COMPARED = frozenset({f.removeprefix("--") for f in NOT_RESULT_FLAGS} | {
    "resume", "overwrite", "gpu", "distributed", "device", "data_dir", "output_dir", "results_dir", "log_dir", "ckpt",
    "variant", "segment", "cluster"})


def record_path(stage: Stage) -> Path:
    """The JSON that describes the stage's artifact. A stage-2 head rewritten by stage 3 is described by
    the copy stage 3 kept of the stage-2 head (`segment_<tag>.front_door.json`)."""
    if stage.artifact.suffix == ".json":
        return stage.artifact
    own = stage.artifact.with_suffix(".json")  # utils.io.provenance_path, without importing torch
    if stage.script.startswith("train_front_door"):
        kept = stage.artifact.with_name(f"{stage.artifact.stem}.front_door.json")
        if str((read_json(own) or {}).get("stage", "")).startswith("fine_tuning") and kept.is_file():
            return kept
    return own


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def record(stage: Stage) -> dict[str, Any] | None:
    """The stage's record (None: no JSON, e.g. a published download, or not made yet)."""
    return read_json(record_path(stage))


@functools.lru_cache(maxsize=None)
def _parser(script: str):
    from loader.datasets_table import DATASETS
    from utils.config import build_parser
    return build_parser(script.removeprefix("train_"), DATASETS)


def asked(stage: Stage) -> dict[str, Any]:
    """The flags the row gives this stage, as its script parses them."""
    return vars(_parser(stage.script).parse_args(list(stage.argv)))


def stale_reason(stage: Stage) -> str:
    """Why the done stage's artifact does not belong to the row ('' when it does, or cannot be checked)."""
    made = record(stage)
    if made is None:
        return ""
    flags, settings = made.get("flags", {}), made.get("settings", {})
    for key, want in asked(stage).items():
        if key in NOT_COMPARED or key not in flags or want is None:
            continue
        had = flags[key] if flags[key] is not None else settings.get(key)
        if had != want:
            shown = "the default" if had is None else repr(had)
            return f"made with other settings ({key}: recorded {shown}, the row asks {want!r})"
    from utils.io import file_sha256  # imports torch: only where there are files to compare
    for role, file in (made.get("upstream") or {}).items():
        if role == "backbone" or not isinstance(file, dict) or "path" not in file:
            continue
        path = Path(file["path"])
        if not path.is_file():
            return f"made from {role} {path}, which is gone"
        if file_sha256(path) != file.get("sha256"):
            return f"made from an earlier {role}: {path} has changed since (retrained?)"
    return ""


def code_version(stage: Stage) -> str | None:
    return (record(stage) or {}).get("code_version")


def feature_cache(stage: Stage) -> str | None:
    """`<dtype> <key[:8]>` of the feature cache the artifact was made from (None: made without one)."""
    cache = (record(stage) or {}).get("feature_cache")
    if not isinstance(cache, dict):
        return None
    return f"{cache.get('dtype', '?')} {str(cache.get('key', ''))[:8]}".strip()
