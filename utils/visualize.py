"""Pictures of segmentations and scores: colour maps, side-by-side panels, per-class IoU and confusion plots.

Every file is written atomically (`utils.io.atomic_write`). Plots are bare `matplotlib.figure.Figure`
objects rendered by the Agg backend: no pyplot, no global backend switch, nothing to close.
"""
from __future__ import annotations

import math
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


def save_panel(path: str | Path, image: np.ndarray, label_maps: Sequence[np.ndarray | torch.Tensor],
               palette: np.ndarray, titles: Sequence[str]) -> None:
    """One PNG: the RGB image (H, W, 3) then each label map coloured, side by side, titled on top.

    `titles` has one entry for the image and one per label map, e.g.
    ``["image", "label", "cluster", "crf", "hungarian"]``.
    """
    if len(titles) != len(label_maps) + 1:
        raise UserError(f"save_panel: expected {len(label_maps) + 1} titles, got {len(titles)}")
    tiles = [np.asarray(image, dtype=np.uint8)] + [colorize(m, palette) for m in label_maps]
    height, width = tiles[0].shape[:2]
    if any(t.shape[:2] != (height, width) for t in tiles):
        raise UserError(f"save_panel: every map must be {height}x{width}, got "
                        f"{[t.shape[:2] for t in tiles]}")
    canvas = Image.new("RGB", (len(tiles) * width + (len(tiles) - 1) * GAP, height + TITLE_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (tile, title) in enumerate(zip(tiles, titles)):
        left = k * (width + GAP)
        canvas.paste(Image.fromarray(tile), (left, TITLE_HEIGHT))
        draw.text((left + 2, 3), title, fill="black")
    atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG"))


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
        left, top = (k // rows) * LEGEND_COLUMN_WIDTH + GAP, (k % rows) * LEGEND_ROW + GAP
        draw.rectangle((left, top, left + LEGEND_ROW - GAP - 1, top + LEGEND_ROW - GAP - 1), fill=colour)
        draw.text((left + LEGEND_ROW + 2, top + 1), text, fill="black")
    atomic_write(Path(path), lambda tmp: canvas.save(tmp, format="PNG"))


def _save_figure(fig: Figure, path: str | Path) -> None:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_class_iou(path: str | Path, class_names: Sequence[str], iou: Sequence[float],
                   is_thing: Sequence[bool]) -> None:
    """Bar chart of per-class IoU (%) on a log axis, things and stuff in two colours.

    Classes with NaN IoU (absent from the split) or IoU 0 get no bar (a log axis cannot show 0).
    """
    if not len(class_names) == len(iou) == len(is_thing):
        raise UserError(f"plot_class_iou: {len(class_names)} names, {len(iou)} IoU values and "
                        f"{len(is_thing)} thing flags; expected equal lengths")
    values = np.asarray(iou, dtype=np.float64)
    shown = np.where(np.isfinite(values) & (values > 0), values, np.nan)
    colors = [THING_COLOR if t else STUFF_COLOR for t in is_thing]
    fig = Figure(figsize=(max(6.0, 0.28 * len(class_names)), 4.0))
    ax = fig.add_subplot()
    ax.bar(np.arange(len(class_names)), shown, color=colors)
    ax.set_yscale("log")
    positive = shown[np.isfinite(shown)]
    ax.set_ylim(min(1.0, positive.min() / 2) if positive.size else 1.0, 100.0)
    ax.set_xticks(np.arange(len(class_names)), class_names, rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(class_names) - 0.4)
    ax.set_ylabel("IoU (%)")
    ax.legend(handles=[Patch(color=THING_COLOR, label="thing"), Patch(color=STUFF_COLOR, label="stuff")],
              ncol=2, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    _save_figure(fig, path)


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
