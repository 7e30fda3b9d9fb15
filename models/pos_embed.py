"""Position-table resizing, done the way each family's own code does it.

All families resize the square pretraining table of patch positions with bicubic interpolation
(`align_corners=False`, no antialias) driven by a scale factor, not an output size:
`scale = (grid + offset) / sqrt(N)` per axis. DINO, iBOT, DINOv2 (released, no registers) and
MAE as the published CAUSE code runs it use `offset = 0.1`; MSN uses `offset = 0`. The scale
factor, not only the output size, sets where bicubic samples, so the two rules give different
tables for the same grid. DINOv2 with registers is different again: its official hub constructors
pass `interpolate_offset=0` and `interpolate_antialias=True`, so the table is resized to the
output size with antialiased bicubic (PyTorch's antialiased kernel is the a = -0.5 cubic, not the
a = -0.75 one of plain bicubic, so it differs even when upsampling). All leave the table untouched
at the pretraining grid.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# offset added to the target grid before dividing by the pretraining grid
INTERPOLATE_OFFSET = {"dino": 0.1, "dinov2": 0.1, "ibot": 0.1, "mae": 0.1, "random": 0.1, "msn": 0.0}


def _scale_reaching(size_in: int, size_out: int, offset: float) -> float:
    """Scale `(size_out + offset) / size_in`, raised by whole ulps if torch's
    `floor(size_in * scale)` would otherwise give `size_out - 1` (possible for offset 0).
    One ulp of the double scale does not change the float32 sampling positions."""
    scale = (size_out + offset) / size_in
    while int(size_in * scale) < size_out:
        scale = math.nextafter(scale, math.inf)
    return scale


def resize_patch_pos_embed(patch_pos: Tensor, grid: tuple[int, int], offset: float | None) -> Tensor:
    """Resize a square table of patch positions `(1, N, D)` to `grid = (rows, cols)`:
    returns `(1, rows * cols, D)`, row-major. Unchanged when `grid` is the pretraining grid.

    `offset` a number: bicubic with `scale_factor = (grid + offset) / sqrt(N)`, no antialias (DINO,
    iBOT, DINOv2, MAE: 0.1; MSN: 0). `offset` None: the DINOv2-with-registers rule, antialiased
    bicubic to the output size."""
    _, n, dim = patch_pos.shape
    side = math.isqrt(n)
    rows, cols = grid
    if (rows, cols) == (side, side):
        return patch_pos
    table = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()  # (1, D, side, side)
    if offset is None:
        resized = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False, antialias=True)
    else:
        scale = (_scale_reaching(side, rows, offset), _scale_reaching(side, cols, offset))
        resized = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False)  # (1, D, rows, cols)
    return resized.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(patch_pos.dtype)


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int], offset: float | None) -> Tensor:
    """`(1, 1 + N, D)` table with the class position first -> `(1, 1 + rows * cols, D)`.
    `offset` None: the DINOv2-with-registers rule (output size, antialiased)."""
    class_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1, D), (1, N, D)
    return torch.cat([class_pos, resize_patch_pos_embed(patch_pos, grid, offset)], dim=1)
