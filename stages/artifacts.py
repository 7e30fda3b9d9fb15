"""Reading and writing the stage artifacts with their provenance checks."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loader.datasets_table import DATASETS
from stages.common import Run, require
from stages.feature_cache import rounded_features_missing
from utils.config import build_parser
from utils.errors import UserError
from utils.io import check_writable_dir, download_record, download_record_path, file_record, file_sha256, \
    load_numpy, load_torch, read_provenance, save_numpy, save_torch, settings_mismatch, unrecorded, write_provenance

OVERWRITE_HINT = "pass --overwrite to replace it, or use another --output_dir"

# The script of each training stage, and the files (by role) its artifact is made from.
SCRIPTS = {"mediator": "train_mediator.py", "front_door_mlp": "train_front_door_mlp.py",
           "front_door_tr": "train_front_door_tr.py", "fine_tuning_mlp": "fine_tuning_mlp.py",
           "fine_tuning_tr": "fine_tuning_tr.py"}
INPUT_ROLES = {"mediator": ("backbone",), "front_door_mlp": ("backbone", "codebook"),
               "front_door_tr": ("backbone", "codebook"), "fine_tuning_mlp": ("backbone", "codebook", "segment"),
               "fine_tuning_tr": ("backbone", "codebook", "segment")}


def stage2_head_path(segment: Path) -> Path:
    """`segment_tr.pth` -> `segment_tr.front_door.pth`: where stage 3 keeps the stage-2 head it starts from
    before it rewrites the published path `segment_tr.pth` with the fine-tuned head."""
    return Path(segment).with_name(f"{Path(segment).stem}.front_door.pth")


def input_paths(run: Run, *roles: str) -> dict[str, Path]:
    """Where this run finds the files of the given roles (backbone checkpoint, codebook, segment head)."""
    paths = {"backbone": run.backbone_file, "codebook": run.paths.codebook, "segment": run.paths.segment}
    return {role: paths[role] for role in roles}


def input_records(run: Run) -> dict[str, dict[str, str]]:
    """Path and sha256 of every file this training stage reads, as they are now (before it trains)."""
    return {role: file_record(path) for role, path in input_paths(run, *INPUT_ROLES[run.args.stage]).items()
            if path.is_file()}


def rebuild_command(run: Run, stage: str) -> str:
    """The command that rebuilds `stage`'s artifact: its script, the flags the user gave this run that the
    script takes, and --overwrite (shell-quoted)."""
    own, takes = build_parser(run.args.stage, DATASETS), vars(build_parser(stage, DATASETS).parse_args([]))
    words = ["python", SCRIPTS[stage]]
    for key, value in vars(run.args).items():
        if key in takes and key not in ("resume", "overwrite") and value != own.get_default(key):
            words += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return shlex.join(words + ["--overwrite"])


def check_upstream(run: Run, artifact: Path, inputs: dict[str, Path], stage: str) -> None:
    """Stop when a file `artifact` was made from (by role in `inputs`) has changed since: its sha256 is not
    the one the artifact's JSON recorded. Files that are absent now, and published files (no JSON), are
    not compared. `stage` is the stage that rebuilds `artifact`."""
    record = read_provenance(artifact)
    if record is None:
        return
    if "upstream" not in record:
        if training(run):
            raise UserError(f"{provenance_name(artifact)} records no upstream hashes (made by an older version): "
                            f"the files {artifact} was made from cannot be checked; rebuild it: "
                            f"{rebuild_command(run, stage)}")
        run.log(f"unchecked: {provenance_name(artifact)} records no upstream hashes (made by an older version); "
                f"the files it was made from are not checked")
        return
    for role, path in inputs.items():
        made_from = record["upstream"].get(role)
        if made_from is None or not path.is_file():
            continue
        now = file_sha256(path)
        if now != made_from["sha256"]:
            after = "" if stage == run.args.stage else ", then the stages after it"
            raise UserError(f"{artifact} is out of date: it was made from {path} with sha256 "
                            f"{made_from['sha256'][:12]}, which has changed since (now {now[:12]}); rebuild it: "
                            f"{rebuild_command(run, stage)}{after}")


def provenance_name(artifact: Path) -> str:
    return Path(artifact).with_suffix(".json").name


def training(run: Run) -> bool:
    """A training stage refuses what it cannot check; an evaluation says in one line what it did not check."""
    return run.args.stage in SCRIPTS


def check_settings(run: Run, artifact: Path, current: dict[str, Any], stage: str) -> None:
    """Stop when `artifact` (made by `stage`) was made with settings other than `current`.

    What cannot be checked, a JSON made before a setting of `current` was recorded, or a file with no
    JSON that download.py did not fetch, stops a training stage and is named in one line by the others;
    a published download (download.py's record) is checked by its shapes only."""
    record = read_provenance(artifact)
    how = f"run {SCRIPTS[stage]} with the same flags, or pass matching flags"
    if record is None:
        if download_record(artifact) is not None:
            run.log(f"note: {artifact} is a published download ({download_record_path(artifact).name}): "
                    f"it has no provenance, only its shapes are checked")
        elif training(run):
            raise UserError(f"{artifact} has no provenance JSON and no download record (made neither by these "
                            f"scripts nor by download.py): its settings cannot be checked; rebuild it: "
                            f"{rebuild_command(run, stage)} (a published file: fetch it with download.py published)")
        else:
            run.log(f"unchecked: {artifact} has no provenance JSON and no download record; only its shapes "
                    f"are checked")
        return
    recorded = record.get("settings", {})
    diffs = settings_mismatch(recorded, current)
    if diffs:
        raise UserError(f"{artifact} was made with other settings ({'; '.join(diffs)}); {how}")
    # an evaluation's val-split fingerprint is never in a training artifact
    missing = [k for k in unrecorded(recorded, current) if k != "data.val"]
    if missing and training(run):
        raise UserError(f"{provenance_name(artifact)} records no {', '.join(missing)} (made by an older version): "
                        f"{artifact} cannot be checked against this run; rebuild it: {rebuild_command(run, stage)}")
    if missing:
        run.log(f"unchecked: {provenance_name(artifact)} records no {', '.join(missing)} (made by an older "
                f"version); {artifact} is not checked for them")


def already_done(run: Run, artifact: Path, settings: dict[str, Any]) -> bool:
    """True when this stage's artifact exists, was made with the same settings from the files this stage
    would read now (same sha256), and no --overwrite/--resume.

    An artifact made with other settings or from files that have changed since stops the run naming the
    difference; so does an artifact folder that cannot be written, before any work is done (nothing is
    created: the folder is made when the artifact is saved)."""
    check_writable_dir(Path(artifact).parent)
    if run.args.overwrite or not Path(artifact).exists():
        return False
    if read_provenance(artifact) is None:
        made = "a published download" if download_record(artifact) is not None else "made elsewhere"
        raise UserError(f"{artifact} already exists without a provenance JSON ({made}); {OVERWRITE_HINT}")
    recorded = recorded_settings(artifact)
    diffs = settings_mismatch(recorded, settings) + [f"{k}: artifact records none (made by an older version)"
                                                     for k in unrecorded(recorded, settings)]
    diffs += rounded_features_missing(recorded, settings)
    if diffs:
        raise UserError(f"{artifact} already exists and was made with other settings "
                        f"({'; '.join(diffs)}); {OVERWRITE_HINT}")
    check_upstream(run, artifact, input_paths(run, *INPUT_ROLES[run.args.stage]), run.args.stage)
    if run.args.resume is True:  # `--resume auto` finds nothing to do instead
        raise UserError(f"{artifact} is already complete; nothing to resume ({OVERWRITE_HINT})")
    run.log(f"{artifact} already exists with these settings; nothing to do ({OVERWRITE_HINT})")
    return True


def save_artifact(run: Run, obj: Any, artifact: Path, settings: dict[str, Any],
                  upstream: dict[str, dict[str, str]]) -> None:
    """Rank 0 writes the artifact (atomically) and its provenance JSON, with the `upstream` file records."""
    if not run.dist.is_main:
        return
    if isinstance(obj, np.ndarray):
        save_numpy(obj, artifact)
    else:
        save_torch(obj, artifact)
    write_provenance(artifact, run.args.stage, settings, run.flags(), upstream, run.data_record())
    download_record_path(artifact).unlink(missing_ok=True)  # it is ours now, no longer the published file
    run.log(f"saved {artifact}")


def recorded_settings(artifact: Path) -> dict[str, Any]:
    """The settings in the provenance JSON beside `artifact` (empty when it has none)."""
    return (read_provenance(artifact) or {}).get("settings", {})


def load_codebook(run: Run) -> torch.Tensor:
    """The stage-1 codebook (K, D), checked against this run's backbone, dataset and K."""
    path = require(run.paths.codebook, "concept codebook (modular.npy)", "train_mediator.py")
    check_settings(run, path, run.shared_settings(), "mediator")
    check_upstream(run, path, input_paths(run, "backbone"), "mediator")
    codebook = load_numpy(path, "concept codebook")
    expected = (run.args.num_codebook, run.derived.embed_dim)
    if codebook.shape != expected:
        raise UserError(f"codebook {path} has shape {codebook.shape}, expected {expected} "
                        f"(--num_codebook x backbone width)")
    return torch.from_numpy(np.asarray(codebook, dtype=np.float32)).to(run.device)


def load_state_dict_checked(run: Run, module: torch.nn.Module, path: Path, what: str, stage: str,
                            settings: dict[str, Any], inputs: dict[str, Path]) -> None:
    """Strict load of a segment/cluster file made by `stage` from `inputs` (files by role); a missing file,
    other settings, a changed input or other shapes stop the run."""
    how = SCRIPTS[stage]
    require(path, what, how)
    check_settings(run, path, settings, stage)
    check_upstream(run, path, inputs, stage)
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


def record_differences(recorded: dict[str, Any], settings: dict[str, Any],
                       upstream: dict[str, dict[str, str]]) -> list[str]:
    """What differs between a recorded result (its "settings" and "upstream" file records) and this run's:
    every setting of either side (one missing on a side counts), and every file whose sha256 changed."""
    before, files = recorded.get("settings", {}), recorded.get("upstream", {})
    diffs = [f"{k}: recorded {before.get(k)!r}, this run has {settings.get(k)!r}"
             for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
    diffs += [f"{role} {now['path']}: sha256 recorded {files.get(role, {}).get('sha256', 'none')[:12]}, "
              f"now {now['sha256'][:12]}" for role, now in upstream.items()
              if files.get(role, {}).get("sha256") != now["sha256"]]
    return diffs


def continue_from(run: Run, module: torch.nn.Module, path: Path, what: str, flag: str, stage: str,
                  settings: dict[str, Any], roles: tuple[str, ...]) -> None:
    """--load_segment / --load_cluster true: start `module` from the artifact already at `path`, made by
    `stage` from the files of `roles` (this run replaces it)."""
    if not path.exists():
        raise UserError(f"--{flag} true continues the {what} {path}, which does not exist; "
                        f"drop --{flag} to train a fresh one")
    load_state_dict_checked(run, module, path, what, stage, settings, input_paths(run, *roles))
    run.log(f"continuing from the {what} {path}")
