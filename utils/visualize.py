"""Pictures of segmentations and scores: colour maps, side-by-side panels, per-class IoU and confusion plots.

Every file is written atomically (`utils.io.atomic_write`). Plots are bare `matplotlib.figure.Figure`
objects rendered by the Agg backend: no pyplot, no global backend switch, nothing to close.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image, ImageDraw

from utils.errors import UserError
from utils.io import atomic_write

THING_COLOR, STUFF_COLOR = "#d62728", "#1f77b4"
TITLE_HEIGHT, GAP = 18, 4
IGNORE_COLOR = (255, 0, 255)  # -1 (ignore, unmatched): magenta, in no dataset palette
IGNORE_NAME = "ignore / unmatched"
LEGEND_ROW, LEGEND_ROWS_PER_COLUMN, LEGEND_COLUMN_WIDTH = 16, 40, 200


def colorize(label_map: np.ndarray | torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """Label map (H, W) -> RGB uint8 (H, W, 3); -1 (ignore, unmatched) is IGNORE_COLOR."""
    labels = label_map.cpu().numpy() if isinstance(label_map, torch.Tensor) else np.asarray(label_map)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"colorize: expected an integer (H, W) label map, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < -1 or labels.max() >= len(palette)):
        raise UserError(f"colorize: labels must lie in [-1, {len(palette)}), "
                        f"got values in [{labels.min()}, {labels.max()}]")
    table = np.concatenate([np.asarray(palette, dtype=np.uint8), np.array([IGNORE_COLOR], np.uint8)])
    return table[labels]                                 # -1 indexes the ignore row appended last


def save_image(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB uint8 (H, W, 3) array as PNG."""
    atomic_write(Path(path), lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


@dataclass(frozen=True)
class Column:
    """One coloured map of a panel: its title, ids (-1 = ignore / unmatched), colours and legend names."""
    title: str
    ids: np.ndarray              # (H, W) integer
    palette: np.ndarray          # (K, 3) uint8, row i colours id i
    names: Sequence[str]         # legend name of id i


def cluster_palette(n: int, avoid: np.ndarray) -> np.ndarray:
    """(n, 3) uint8 colours for raw cluster ids: pastel hues a golden angle apart, all distinct, none black,
    IGNORE_COLOR or a row of `avoid` (the class palette), so that an unmatched cluster never shows a class colour."""
    taken = {tuple(int(c) for c in row) for row in np.asarray(avoid)} | {IGNORE_COLOR, (0, 0, 0)}
    colours = []
    for i in range(n):
        hue, light = (i * 0.6180339887) % 1.0, (0.80, 0.68, 0.90)[i % 3]
        rgb = [round(255 * (light + (1 - light) * 0.5 * math.cos(2 * math.pi * (hue - shift)))) for shift in
               (0.0, 1 / 3, 2 / 3)]
        while tuple(rgb) in taken:            # nudge an exact collision to the next free colour
            rgb[i % 3] = (rgb[i % 3] + 1) % 256
        taken.add(tuple(rgb))
        colours.append(rgb)
    return np.array(colours, dtype=np.uint8).reshape(n, 3)


def panel_columns(label: np.ndarray | None, cluster: np.ndarray, crf: np.ndarray, matched: np.ndarray | None,
                  class_names: Sequence[str], class_colors: np.ndarray, cluster_colors: np.ndarray) -> list[Column]:
    """The coloured columns of an evaluation panel: the label (left out when the image has none: no pixel
    >= 0), the raw cluster and CRF maps in cluster colours, the Hungarian-matched map in class colours."""
    clusters = [f"cluster {i}" for i in range(len(cluster_colors))]
    columns = []
    if label is not None and (np.asarray(label) >= 0).any():
        columns.append(Column("label", np.asarray(label), class_colors, class_names))
    columns += [Column("cluster (raw ids)", np.asarray(cluster), cluster_colors, clusters),
                Column("crf (raw ids)", np.asarray(crf), cluster_colors, clusters)]
    if matched is not None:
        columns.append(Column("hungarian", np.asarray(matched), class_colors, class_names))
    return columns


def legend_entries(columns: Sequence[Column]) -> list[tuple[tuple[int, int, int], str]]:
    """(colour, name) of every id the columns show, in column order, each once; then IGNORE_NAME if -1 shows."""
    entries: dict[tuple[tuple[int, int, int], str], None] = {}
    ignored = False
    for column in columns:
        for i in np.unique(column.ids).tolist():
            ignored |= i < 0
            if i >= 0:
                entries[(tuple(int(c) for c in column.palette[i]), f"{i}: {column.names[i]}")] = None
    return list(entries) + ([(IGNORE_COLOR, IGNORE_NAME)] if ignored else [])


def save_panel(path: str | Path, image: np.ndarray, columns: Sequence[Column]) -> None:
    """One PNG: the RGB image (H, W, 3) then each column coloured, side by side and titled on top, with a
    legend below naming every colour shown."""
    tiles = [np.asarray(image, dtype=np.uint8)] + [colorize(c.ids, c.palette) for c in columns]
    height, width = tiles[0].shape[:2]
    if any(t.shape[:2] != (height, width) for t in tiles):
        raise UserError(f"save_panel: every map must be {height}x{width}, got "
                        f"{[t.shape[:2] for t in tiles]}")
    entries = legend_entries(columns)
    full_width = len(tiles) * width + (len(tiles) - 1) * GAP
    per_row = max(1, full_width // LEGEND_COLUMN_WIDTH)
    legend_top = TITLE_HEIGHT + height + GAP
    canvas = Image.new("RGB", (full_width, legend_top + math.ceil(len(entries) / per_row) * LEGEND_ROW), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (tile, title) in enumerate(zip(tiles, ["image"] + [c.title for c in columns])):
        left = k * (width + GAP)
        canvas.paste(Image.fromarray(tile), (left, TITLE_HEIGHT))
        draw.text((left + 2, 3), title, fill="black")
    for k, (colour, text) in enumerate(entries):
        left, top = (k % per_row) * LEGEND_COLUMN_WIDTH, legend_top + (k // per_row) * LEGEND_ROW
        draw_swatch(draw, left, top, colour, text)
    atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG"))


def draw_swatch(draw: ImageDraw.ImageDraw, left: int, top: int, colour: tuple[int, int, int], text: str) -> None:
    """A LEGEND_ROW-high legend entry: a square of `colour` at (left, top), then `text`."""
    draw.rectangle((left, top, left + LEGEND_ROW - GAP - 1, top + LEGEND_ROW - GAP - 1), fill=colour,
                   outline=(96, 96, 96))
    draw.text((left + LEGEND_ROW + 2, top + 1), text, fill="black")


def save_legend(path: str | Path, names: Sequence[str], palette: np.ndarray) -> None:
    """One PNG: a colour swatch and the name of each class (palette row i <-> names[i]), then ignore,
    in columns of LEGEND_ROWS_PER_COLUMN rows."""
    if len(names) > len(palette):
        raise UserError(f"save_legend: {len(names)} names but a palette of {len(palette)} colours")
    entries = [(tuple(int(c) for c in palette[i]), f"{i}: {name}") for i, name in enumerate(names)]
    entries.append((IGNORE_COLOR, IGNORE_NAME))
    rows = min(len(entries), LEGEND_ROWS_PER_COLUMN)
    columns = math.ceil(len(entries) / LEGEND_ROWS_PER_COLUMN)
    canvas = Image.new("RGB", (columns * LEGEND_COLUMN_WIDTH, rows * LEGEND_ROW + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (colour, text) in enumerate(entries):
        draw_swatch(draw, (k // rows) * LEGEND_COLUMN_WIDTH + GAP, (k % rows) * LEGEND_ROW + GAP, colour, text)
    atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG"))


def _save_figure(fig: Figure, path: str | Path) -> None:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_class_iou(path: str | Path, class_names: Sequence[str], iou: Sequence[float],
                   is_thing: Sequence[bool]) -> Figure:
    """Bar chart of per-class IoU (%) on a linear 0-100 axis, things and stuff in two colours; the
    figure is returned as well as written. Classes with NaN IoU (absent from the split) get no bar."""
    if not len(class_names) == len(iou) == len(is_thing):
        raise UserError(f"plot_class_iou: {len(class_names)} names, {len(iou)} IoU values and "
                        f"{len(is_thing)} thing flags; expected equal lengths")
    values = np.asarray(iou, dtype=np.float64)
    shown = np.where(np.isfinite(values), values, np.nan)
    colors = [THING_COLOR if t else STUFF_COLOR for t in is_thing]
    fig = Figure(figsize=(max(6.0, 0.28 * len(class_names)), 4.0))
    ax = fig.add_subplot()
    ax.bar(np.arange(len(class_names)), shown, color=colors)
    ax.set_ylim(0.0, 100.0)
    ax.set_xticks(np.arange(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(class_names) - 0.4)
    ax.set_ylabel("IoU (%)")
    ax.legend(handles=[Patch(color=THING_COLOR, label="thing"), Patch(color=STUFF_COLOR, label="stuff")],
              ncol=2, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    _save_figure(fig, path)
    return fig


def plot_confusion(path: str | Path, confusion: np.ndarray, class_names: Sequence[str]) -> None:
    """Row-normalised confusion matrix (rows = true class, columns = predicted class) as a picture."""
    confusion = np.asarray(confusion, dtype=np.float64)
    n = len(class_names)
    if confusion.shape != (n, n):
        raise UserError(f"plot_confusion: expected a ({n}, {n}) matrix for {n} classes, got {confusion.shape}")
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    size = max(5.0, 0.25 * n)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    im = ax.imshow(normalised, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(np.arange(n), class_names, rotation=90, fontsize=6)
    ax.set_yticks(np.arange(n), class_names, fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save_figure(fig, path)
