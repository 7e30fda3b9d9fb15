"""The table as a figure (PNG for slides, PDF vector for papers): per setting, the measured unsupervised mIoU
with CRF (the seeds' mean, with error bar ± std and a dot per seed), the k-means baseline on the same
backbone as a reference bar, and the published value as a marker where one exists; values on the bars."""
from __future__ import annotations

from pathlib import Path

from utils.io import atomic_write

MEASURED, BASELINE, PUBLISHED = "#3b6fb6", "#b0b0b0", "#d62728"
LEGEND_ORDER = ("k-means on the backbone", "CAUSE, measured", "one seed", "published")


def _settings(rows) -> list[tuple[object, list]]:
    """(aggregate or single line, its seed lines) per setting, in table order."""
    groups: list[tuple[object, list]] = []
    seeds: list = []
    for r in rows:
        if r.is_aggregate:
            groups.append((r, seeds))
            seeds = []
        else:
            if seeds and _key(seeds[0]) != _key(r):
                groups.append((seeds[0], seeds))
                seeds = []
            seeds.append(r)
    if seeds:
        groups.append((seeds[0], seeds))
    return groups


def _key(r) -> tuple:
    return tuple(r.values[c] for c in ("dataset", "structure", "backbone", "K", "p", "batch", "flags"))


def _label(r) -> str:
    v = r.values
    flags = "" if v["flags"] == "-" else f" {v['flags']}"
    return f"{v['dataset']} {v['structure']}\n{v['backbone']}\nK={v['K']} p={v['p']}{flags}"


def _done(r, column: str) -> float | None:
    value = r.values.get(column)
    return value if isinstance(value, float) and column not in r.stale else None


def plot(rows, out: Path) -> list[Path]:
    """Write the figure of the table's `rows` to `out` with .png (200 dpi) and .pdf; the paths written."""
    import matplotlib
    matplotlib.rcParams["pdf.fonttype"] = 42  # TrueType in the PDF: editable text
    fig = figure(rows)
    written = []
    for suffix, dpi in ((".png", 200), (".pdf", None)):
        path = out.with_suffix(suffix)
        atomic_write(path, lambda tmp, s=suffix[1:], d=dpi: fig.savefig(tmp, format=s, dpi=d))
        written.append(path)
    return written


def figure(rows):
    """The matplotlib Figure of the table's `rows` (TableRow, launch/table.py)."""
    from matplotlib.figure import Figure

    groups = _settings(rows)
    fig = Figure(figsize=(max(6.4, 2.2 * len(groups) + 1.5), 5.2))
    ax = fig.add_subplot()
    width, top = 0.36, 0.0
    labelled: set[str] = set()

    def legend_once(name: str) -> str:
        if name in labelled:
            return "_nolegend_"
        labelled.add(name)
        return name

    for x, (line, seeds) in enumerate(groups):
        mean, base = _done(line, "CRF mIoU"), _done(line, "k-means CRF mIoU")
        if base is not None:
            bar = ax.bar(x - width / 2, base, width, color=BASELINE, label=legend_once("k-means on the backbone"))
            ax.bar_label(bar, fmt="%.1f", fontsize=10, padding=2)
            top = max(top, base)
        if mean is not None:
            spread = line.spread.get("CRF mIoU") if line.spread else None
            std = spread[0] if spread and len(seeds) > 1 else None
            bar = ax.bar(x + width / 2, mean, width, color=MEASURED, label=legend_once("CAUSE, measured"),
                         yerr=std, capsize=5, error_kw={"elinewidth": 1.2})
            shown = f"{mean:.1f}" + (f"\n± {std:.1f}" if std is not None else "")
            ax.bar_label(bar, labels=[shown], fontsize=10, padding=3 if std is None else 14)
            points = [v for v in (_done(s, "CRF mIoU") for s in seeds) if v is not None]
            if len(points) > 1:
                ax.scatter([x + width / 2] * len(points), points, s=22, color="black", zorder=3,
                           label=legend_once("one seed"))
            top = max(top, mean + (std or 0.0), *points)
        published = line.values.get("published mIoU")
        if isinstance(published, float):
            ax.plot([x + width / 2 - width * 0.6, x + width / 2 + width * 0.6], [published, published],
                    color=PUBLISHED, linewidth=2.5, label=legend_once("published"))
            ax.annotate(f"{published:.1f}", (x + width / 2 + width * 0.62, published), fontsize=9,
                        color=PUBLISHED, va="center")
            top = max(top, published)
    ax.set_xticks(range(len(groups)), [_label(line) for line, _ in groups], fontsize=10)
    ax.set_xlim(-0.7, len(groups) - 0.3)
    ax.set_ylim(0, min(100.0, top * 1.25 + 5))
    ax.set_ylabel("unsupervised mIoU with CRF (%)", fontsize=12)
    ax.tick_params(axis="y", labelsize=10)
    recipe = groups[0][0].values.get("recipe") if groups else ""
    ax.set_title(f"CAUSE, measured vs published (recipe {recipe})", fontsize=13)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    handles, names = ax.get_legend_handles_labels()
    if handles:
        order = sorted(range(len(names)), key=lambda i: LEGEND_ORDER.index(names[i]))
        ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=10, loc="upper left",
                  ncols=2, frameon=False)
    fig.tight_layout()
    return fig
