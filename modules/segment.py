"""Segment heads (MLP, TR) with EMA teachers, projection heads, linear probe, and the Cluster
parameters.  Module names and parameter shapes equal the published CAUSE checkpoints
(``segment_{mlp,tr}.pth``, ``cluster_*.pth``), so those load with ``strict=True``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.functional import vector_quantize
from utils.errors import UserError


class TokenConv1x1(nn.Conv2d):
    """A 1x1 convolution applied to tokens (..., in) -> (..., out) as one matmul.

    Weights keep the Conv2d shape (out, in, 1, 1) and init of the published checkpoints.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


class Projection(nn.Module):
    """One layer kept under the key ``f`` (published layout of projection heads and probe)."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)


class _TwoBranch(nn.Module):
    """Reduction to r channels: f1(drop(x)) + f2(drop(x)), f2 = conv, ReLU, conv; the dropout
    masks of the two branches are drawn independently (training mode only)."""

    def _add_branches(self, dim: int, reduced_dim: int, dropout: float) -> None:
        self.f1 = TokenConv1x1(dim, reduced_dim)
        self.f2 = nn.Sequential(TokenConv1x1(dim, dim), nn.ReLU(), TokenConv1x1(dim, reduced_dim))
        self.branch_dropout = nn.Dropout(dropout)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.f1(self.branch_dropout(x)) + self.f2(self.branch_dropout(x))


class MLPHead(_TwoBranch):
    """(B, N, D) -> (B, N, r)."""

    def __init__(self, dim: int, reduced_dim: int, dropout: float = 0.1):
        super().__init__()
        self._add_branches(dim, reduced_dim, dropout)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self._reduce(feat)


class TRDecoderLayer(_TwoBranch):
    """One post-norm decoder layer (single head) followed by ``memory + norm3(out)`` and the
    two-branch reduction.  tgt, memory: (B, N, D); pos: (N, D) -> (B, N, r)."""

    def __init__(self, dim: int, reduced_dim: int, hidden_dim: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, 1, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, 1, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self._add_branches(dim, reduced_dim, dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = tgt + pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attended = self.multihead_attn(tgt + pos, memory, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        tgt = tgt + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(tgt)))))
        return self._reduce(memory + self.norm3(tgt))


class TRHead(nn.Module):
    """Queries = vq(feat, codebook) + learned query_pos, decoded against feat: (B, N, D) -> (B, N, r).

    The codebook is a non-persistent buffer (not in the state dict), set by ``set_codebook``.
    """

    def __init__(self, dim: int, reduced_dim: int, num_queries: int):
        super().__init__()
        self.register_buffer("codebook", None, persistent=False)
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim))
        self.tr = TRDecoderLayer(dim, reduced_dim)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        if self.codebook is None:
            raise RuntimeError("TR head has no codebook: call set_codebook() first")
        if feat.shape[1] != self.query_pos.shape[0]:
            raise UserError(f"TR head was built for {self.query_pos.shape[0]} tokens, got {feat.shape[1]} "
                            "(train/test resolution and patch size must match the head)")
        queries, _ = vector_quantize(feat, self.codebook)  # (B, N, D)
        return self.tr(queries, feat, self.query_pos)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float = 0.99) -> None:
    """teacher = decay * teacher + (1 - decay) * student, parameter by parameter."""
    t, s = list(teacher.parameters()), list(student.parameters())
    torch._foreach_mul_(t, decay)
    torch._foreach_add_(t, s, alpha=1.0 - decay)


class _Segment(nn.Module):
    """Student head + projection head, their EMA teachers (no gradient), and the linear probe.

    head(_ema): (B, N, D) -> (B, N, r); projection_head(_ema): (B, N, r) -> (B, N, p);
    linear: (B, r, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim: int, make_head: Callable[[], nn.Module], reduced_dim: int,
                 projection_dim: int, n_classes: int):
        super().__init__()
        self.dim = dim
        self.head = make_head()
        self.projection_head = Projection(TokenConv1x1(reduced_dim, projection_dim))
        self.head_ema = make_head()
        self.projection_head_ema = Projection(TokenConv1x1(reduced_dim, projection_dim))
        self.linear = Projection(nn.Conv2d(reduced_dim, n_classes, kernel_size=1))
        for student, teacher in ((self.head, self.head_ema), (self.projection_head, self.projection_head_ema)):
            teacher.load_state_dict(student.state_dict())
            teacher.requires_grad_(False)

    def _check_codebook(self, codebook: torch.Tensor) -> None:
        if codebook.dim() != 2 or codebook.shape[1] != self.dim:
            raise UserError(f"codebook must have shape (K, {self.dim}), got {tuple(codebook.shape)}")

    def set_codebook(self, codebook: torch.Tensor) -> None:
        self._check_codebook(codebook)

    def ema_update(self, decay: float = 0.99) -> None:
        ema_update(self.head_ema, self.head, decay)
        ema_update(self.projection_head_ema, self.projection_head, decay)


class SegmentMLP(_Segment):
    def __init__(self, dim: int, reduced_dim: int = 90, projection_dim: int = 2048, n_classes: int = 27):
        super().__init__(dim, lambda: MLPHead(dim, reduced_dim), reduced_dim, projection_dim, n_classes)


class SegmentTR(_Segment):
    def __init__(self, dim: int, num_queries: int, reduced_dim: int = 90, projection_dim: int = 2048,
                 n_classes: int = 27):
        super().__init__(dim, lambda: TRHead(dim, reduced_dim, num_queries), reduced_dim, projection_dim,
                         n_classes)

    def set_codebook(self, codebook: torch.Tensor) -> None:
        """Queries of head and head_ema come from this (K, D) codebook (kept out of the state dict)."""
        self._check_codebook(codebook)
        codebook = codebook.detach().to(self.head.query_pos)
        self.head.codebook = codebook
        self.head_ema.codebook = codebook


class Cluster(nn.Module):
    """Concept codebook (K, D), init U[-1/K, 1/K], and cluster probe (C, r), init U[-1/C, 1/C]."""

    def __init__(self, dim: int, reduced_dim: int = 90, num_codebook: int = 2048, n_classes: int = 27):
        super().__init__()
        self.codebook = nn.Parameter(torch.empty(num_codebook, dim).uniform_(-1 / num_codebook, 1 / num_codebook))
        self.cluster_probe = nn.Parameter(torch.empty(n_classes, reduced_dim).uniform_(-1 / n_classes, 1 / n_classes))
