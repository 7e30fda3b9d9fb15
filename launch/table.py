"""Published vs measured: one line per row (each seed), and one aggregate line per setting with several seeds
(mean ± std, n, min and max of each score, and whether the published number lies within the seeds' range).
Printed as Markdown; with --out FILE.md also FILE.csv and the figure FILE.png / FILE.pdf (launch/figure.py).

Published values come from the published-row table (`download.py list`); measured ones from the
metrics.json files the test scripts wrote (test_{mlp,tr}.py and test_kmeans.py), never retyped. A stale
number (launch/records.py) is marked so and left out of the aggregates.
"""
from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path

from launch import records
from launch.rows import Row, Settings, Stage, flags_hash, variant
from launch.status import known_jobs, row_status, summary
from utils.io import atomic_write

ROW_COLUMNS = ("dataset", "structure", "backbone", "recipe", "K", "p", "batch", "seed", "flags")
SCORES = {"mIoU": ("unsupervised", "mIoU"), "Acc": ("unsupervised", "Acc"),
          "CRF mIoU": ("unsupervised_crf", "mIoU"), "CRF Acc": ("unsupervised_crf", "Acc"),
          "linear mIoU": ("linear", "mIoU"), "linear Acc": ("linear", "Acc")}
KMEANS = {"k-means CRF mIoU": ("unsupervised_crf", "mIoU"), "k-means CRF Acc": ("unsupervised_crf", "Acc")}
MEASURED = (*SCORES, *KMEANS)
COLUMNS = (*ROW_COLUMNS, "n", "published mIoU", "published Acc", *SCORES, "CRF mIoU - published", *KMEANS,
           "published in seed range", "cache", "commit", "status")
SPREAD = tuple(f"{score} {stat}" for score in (*MEASURED, "CRF mIoU - published") for stat in ("std", "min", "max"))


@dataclass
class TableRow:
    values: dict[str, str | float | int | None]
    stale: frozenset[str] = frozenset()   # measured columns whose number is stale
    spread: dict[str, tuple[float, float, float]] | None = None  # aggregate line: column -> (std, min, max)

    def cell(self, column: str) -> str:
        v = self.values.get(column)
        if v is None:
            return "-"
        text = f"{v:+.1f}" if column == "CRF mIoU - published" else f"{v:.1f}" if isinstance(v, float) else str(v)
        if self.spread and column in self.spread:
            std, lo, hi = self.spread[column]
            text += f" ± {std:.1f} [{lo:.1f}, {hi:.1f}]"
        return text + (" (stale)" if column in self.stale else "")

    @property
    def is_aggregate(self) -> bool:
        return self.spread is not None


def _score(metrics: dict | None, kind: str, key: str) -> float | None:
    value = (metrics or {}).get(kind, {}).get(key)
    return float(value) if value is not None else None


def _commit(stages: list[Stage]) -> str | None:
    """The commits the row's stages recorded; several: named, with a note."""
    found = list(dict.fromkeys(c for c in map(records.code_version, stages) if c))
    if len(found) > 1:
        return f"{', '.join(found)} (stages ran at different commits)"
    return found[0] if found else None


def _cache(stages: list[Stage]) -> str | None:
    """The feature cache the test's head was made from (metrics.json), else any stage's."""
    return next((c for c in map(records.feature_cache, reversed(stages)) if c), None)


def row_columns(row: Row, settings: Settings) -> dict[str, str | int]:
    """The identity columns of a row: what `list`, `status` and `table` show."""
    sizes = row.sizes
    return {"dataset": row.dataset, "structure": row.structure, "backbone": row.backbone, "recipe": settings.recipe,
            "K": sizes["num_codebook"], "p": sizes["projection_dim"], "batch": sizes["batch_size"], "seed": row.seed,
            "flags": flags_hash(settings.passthrough) or "-"}


def listing(plan: list[tuple[Row, list[Stage]]], settings: Settings) -> str:
    """`reproduce.py list`: every row of the call (the cross product of the sweeps) and its folder."""
    header = (*ROW_COLUMNS, "folder", "published")
    lines = [header]
    for row, stages in plan:
        pub = row.published
        test = stages[-1]
        lines.append((*map(str, row_columns(row, settings).values()), test.artifact.parent.name,
                      f"mIoU {pub.miou:.1f}" if pub else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def table_rows(plan: list[tuple[Row, list[Stage]]], settings: Settings) -> list[TableRow]:
    """One line per row, each setting's seeds followed by their aggregate line (where it has several seeds)."""
    jobs = known_jobs([s for _, stages in plan for s in stages], settings.log_dir, strict=False)
    by_setting: dict[tuple, list[TableRow]] = {}
    for row, stages in plan:
        by_setting.setdefault((row.setting, variant(row, settings)), []).append(_row_line(row, stages, settings, jobs))
    lines = []
    for group in by_setting.values():
        lines += group
        if len(group) > 1:
            lines.append(_aggregate(group))
    return lines


def _row_line(row: Row, stages: list[Stage], settings: Settings, jobs: dict[str, str] | None) -> TableRow:
    statuses = row_status(stages, settings.log_dir, jobs)
    state = {s.stage.script: s.state for s in statuses}
    test, kmeans = stages[-1], next(s for s in stages if s.script == "test_kmeans")
    measured = records.record(test) if state[test.script] in ("done", "stale") else None
    baseline = records.record(kmeans) if state["test_kmeans"] in ("done", "stale") else None
    published = row.published
    values: dict[str, str | float | int | None] = dict(row_columns(row, settings))
    values.update({k: _score(measured, *where) for k, where in SCORES.items()})
    values.update({k: _score(baseline, *where) for k, where in KMEANS.items()})
    crf = values["CRF mIoU"]
    values.update({
        "published mIoU": published.miou if published else None,
        "published Acc": published.pacc if published else None,
        "CRF mIoU - published": crf - published.miou if isinstance(crf, float) and published else None,
        "cache": _cache(stages), "commit": _commit(stages), "status": summary(statuses)})
    stale = {*SCORES, "CRF mIoU - published"} if state[test.script] == "stale" else set()
    stale |= set(KMEANS) if state["test_kmeans"] == "stale" else set()
    return TableRow(values, frozenset(stale))


def _aggregate(group: list[TableRow]) -> TableRow:
    """mean ± std (sample), min and max of each score over the seeds whose number is done (not stale); a
    score that only one seed has is shown as it is."""
    first = group[0].values
    values: dict[str, str | float | int | None] = {c: first[c] for c in ROW_COLUMNS if c != "seed"}
    values.update({"seed": "all", "published mIoU": first["published mIoU"], "published Acc": first["published Acc"],
                   "status": "aggregate"})
    spread: dict[str, tuple[float, float, float]] = {}
    counts = []
    for column in (*MEASURED, "CRF mIoU - published"):
        found = [r.values[column] for r in group if isinstance(r.values[column], float) and column not in r.stale]
        if column == "CRF mIoU":
            counts.append(len(found))
        if found:
            values[column] = statistics.fmean(found)
        if len(found) > 1:
            spread[column] = (statistics.stdev(found), min(found), max(found))
    values["n"] = counts[0]
    published = first["published mIoU"]
    if isinstance(published, float) and "CRF mIoU" in spread:
        _, lo, hi = spread["CRF mIoU"]
        values["published in seed range"] = f"{'yes' if lo <= published <= hi else 'no'}: {published:.1f} " \
                                            f"{'in' if lo <= published <= hi else 'outside'} [{lo:.1f}, {hi:.1f}]"
    return TableRow(values, spread=spread)


def markdown(rows: list[TableRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(r.cell(c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(rows: list[TableRow], out: Path) -> list[Path]:
    """FILE.md, FILE.csv (numbers unrounded; an aggregate line's scores are means, with their std, min and
    max in the columns after `status`; a stale number is left out) and the figure FILE.png and FILE.pdf."""
    from launch.figure import plot
    md, csv_path = out.with_suffix(".md"), out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(md, lambda tmp: Path(tmp).write_text(markdown(rows) + "\n"))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow((*COLUMNS, *SPREAD))
    for r in rows:
        cells = ["" if r.values.get(c) is None or c in r.stale else r.values[c] for c in COLUMNS]
        spread = [(r.spread or {}).get(c, ("", "", "")) for c in (*MEASURED, "CRF mIoU - published")]
        writer.writerow([*cells, *(v for triple in spread for v in triple)])
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(text.getvalue()))
    return [md, csv_path, *plot(rows, out)]
