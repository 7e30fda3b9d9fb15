"""DINOv3's axial rotary position embedding (no learned weights, no interpolation).

Patch centres are placed on `[-1, 1]` per axis, each axis normalised by its own patch count
(the official `normalize_coords="separate"`), so any grid works. A head of width `d` is split into
`d / 4` frequencies per axis with periods `base ** (2 i / (d / 2))`; rows use the first half of the
angles, columns the second, and the angles are tiled twice to rotate the two halves of the head
against each other. Everything is computed in float32, as the official release (`pos_embed_rope_dtype
= "fp32"`) does; the training-only coordinate augmentations (shift, jitter, rescale) are not used.
"""

import math

import torch
from torch import Tensor


def rope_periods(head_dim: int, base: float) -> Tensor:
    """`(head_dim / 4,)` float32 periods `base ** (2 i / (head_dim / 2))`."""
    exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    return base ** exponents


def rope_sin_cos(periods: Tensor, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """Sine and cosine `(rows * cols, head_dim)` of the angles of each patch, row-major, float32."""
    periods = periods.float()
    ys = torch.arange(0.5, rows, dtype=torch.float32, device=periods.device) / rows  # (rows,)
    xs = torch.arange(0.5, cols, dtype=torch.float32, device=periods.device) / cols  # (cols,)
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).flatten(0, 1)  # (N, 2) in [0, 1]
    coords = 2.0 * coords - 1.0  # (N, 2) in [-1, 1]
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # (N, 2, head_dim / 4)
    angles = angles.flatten(1, 2).tile(2)  # (N, head_dim)
    return torch.sin(angles), torch.cos(angles)


def rotate_half(x: Tensor) -> Tensor:
    """`[a, b] -> [-b, a]` over the last dimension (split in two halves)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate `x (..., N, head_dim)` by the angles of `sin, cos (N, head_dim)`, computed in their dtype."""
    dtype = x.dtype
    x = x.to(sin.dtype)
    return (x * cos + rotate_half(x) * sin).to(dtype)
