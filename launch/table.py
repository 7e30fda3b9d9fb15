"""Published vs measured, per row: Markdown (printed), and with --out FILE.md also FILE.csv and FILE.png.

Published values come from the published-row table (`download.py list`); measured ones from the
metrics.json files the test scripts wrote (test_{mlp,tr}.py and test_kmeans.py), never retyped.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from launch.jobs import job_file
from launch.rows import Row, Settings, Stage
from launch.status import known_jobs, row_status, summary
from utils.io import atomic_write

COLUMNS = ("dataset", "structure", "backbone", "published mIoU", "published Acc", "mIoU", "Acc", "CRF mIoU",
           "CRF Acc", "CRF mIoU - published", "linear mIoU", "linear Acc", "k-means CRF mIoU", "k-means CRF Acc",
           "recipe", "commit", "status")


@dataclass
class TableRow:
    values: dict[str, str | float | None]

    def cell(self, column: str) -> str:
        v = self.values.get(column)
        if v is None:
            return "-"
        return f"{v:+.1f}" if column == "CRF mIoU - published" else f"{v:.1f}" if isinstance(v, float) else str(v)


def _metrics(path: Path) -> dict | None:
    from stages.evaluate import read_metrics
    return read_metrics(path)


def _score(metrics: dict | None, kind: str, key: str) -> float | None:
    value = (metrics or {}).get(kind, {}).get(key)
    return float(value) if value is not None else None


def table_rows(plan: list[tuple[Row, list[Stage]]], settings: Settings) -> list[TableRow]:
    jobs = known_jobs([s for _, stages in plan for s in stages], settings.log_dir, strict=False)
    rows = []
    for row, stages in plan:
        test, kmeans = stages[-1], next(s for s in stages if s.script == "test_kmeans")
        measured, baseline = _metrics(test.artifact), _metrics(kmeans.artifact)
        published = row.published
        crf = _score(measured, "unsupervised_crf", "mIoU")
        commit_file = job_file(settings.log_dir, test, ".commit")
        recipe = None
        if measured is not None:
            recipe = "published" if measured.get("flags", {}).get("published_recipe") else "default"
        rows.append(TableRow({
            "dataset": row.dataset, "structure": row.structure, "backbone": row.backbone,
            "published mIoU": published.miou if published else None,
            "published Acc": published.pacc if published else None,
            "mIoU": _score(measured, "unsupervised", "mIoU"), "Acc": _score(measured, "unsupervised", "Acc"),
            "CRF mIoU": crf, "CRF Acc": _score(measured, "unsupervised_crf", "Acc"),
            "CRF mIoU - published": crf - published.miou if crf is not None and published else None,
            "linear mIoU": _score(measured, "linear", "mIoU"), "linear Acc": _score(measured, "linear", "Acc"),
            "k-means CRF mIoU": _score(baseline, "unsupervised_crf", "mIoU"),
            "k-means CRF Acc": _score(baseline, "unsupervised_crf", "Acc"),
            "recipe": recipe,
            "commit": commit_file.read_text().strip() if measured is not None and commit_file.exists() else None,
            "status": summary(row_status(stages, settings.log_dir, jobs)),
        }))
    return rows


def markdown(rows: list[TableRow]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(r.cell(c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(rows: list[TableRow], out: Path) -> list[Path]:
    """FILE.md, FILE.csv (numbers unrounded) and FILE.png (published vs measured CRF mIoU per row)."""
    md, csv_path, png = out.with_suffix(".md"), out.with_suffix(".csv"), out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(md, lambda tmp: Path(tmp).write_text(markdown(rows) + "\n"))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(["" if r.values.get(c) is None else r.values[c] for c in COLUMNS])
    atomic_write(csv_path, lambda tmp: Path(tmp).write_text(text.getvalue()))
    _plot(rows, png)
    return [md, csv_path, png]


def _plot(rows: list[TableRow], path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    labels = [f"{r.values['dataset']}\n{r.values['backbone']}\n{r.values['structure']}" for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 4.0))
    ax = fig.add_subplot()
    for offset, column, name in ((-0.2, "published mIoU", "published"), (0.2, "CRF mIoU", "measured")):
        heights = [r.values.get(column) for r in rows]
        ax.bar(x + offset, [np.nan if h is None else h for h in heights], width=0.4, label=name)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("unsupervised mIoU with CRF (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
