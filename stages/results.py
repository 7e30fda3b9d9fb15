"""A results folder holds one model's outputs: an evaluation claims it before writing anything.

`model.json` in the folder records what its outputs were made from: the settings (data, test
resolution, precision, ...) and the path and sha256 of every file read (backbone, segment head,
cluster probe). Evaluating the same again recomputes the outputs in place; anything else stops
the run unless --overwrite, which first removes the earlier outputs. Only the files and folders an
evaluation writes are removed, never anything else in the folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from stages.artifacts import record_differences
from stages.common import Run
from utils.distributed import barrier
from utils.errors import UserError
from utils.io import read_json, save_json

MODEL_RECORD = "model.json"
OUTPUT_FILES = (MODEL_RECORD, "metrics.json", "index.csv", "legend.png", "class_iou.png", "confusion.png")
OUTPUT_FOLDERS = ("imgs", "labels", "kmeans", "crfs", "hungarians", "panels", "maps")


def claim_results(run: Run, out: Path, record: dict[str, Any]) -> None:
    """Make `out` hold only the outputs of the model `record` ("settings", "upstream") describes.

    Earlier outputs of the same model are removed and recomputed; those of another model (or made
    otherwise, or by a version that kept no record) stop the run naming the difference, unless
    --overwrite. Every rank decides alike; rank 0 removes and records, the others wait."""
    earlier = _earlier_record(out)
    if earlier is not None:
        diffs = ["no record of the model they were made from"] if not earlier \
            else record_differences(earlier, record["settings"], record["upstream"])
        if diffs and not run.args.overwrite:
            raise UserError(f"{out} holds the results of another model or settings ({'; '.join(diffs)}); "
                            f"pass --overwrite to replace them, or use another --results_dir")
        run.log(f"{out}: replacing the results of another model or settings (--overwrite)" if diffs
                else f"{out}: recomputing the results of this same model and settings")
    if run.dist.is_main:
        if earlier is not None:
            _remove_outputs(out)
        save_json({"settings": record["settings"], "upstream": record["upstream"]}, out / MODEL_RECORD)
    barrier()


def _earlier_record(out: Path) -> dict[str, Any] | None:
    """What made the outputs already in `out`: its model.json (or the metrics.json of a version that wrote
    none); {} when outputs are there without a record; None when `out` holds no output."""
    for name in (MODEL_RECORD, "metrics.json"):
        record = read_json(out / name, "results record")
        if record is not None:
            return record
    present = any((out / name).exists() for name in OUTPUT_FILES + OUTPUT_FOLDERS)
    return {} if present else None


def _remove_outputs(out: Path) -> None:
    for name in OUTPUT_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
