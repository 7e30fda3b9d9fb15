"""Straightforward loop implementations of the method's math, written the way the published code
computes it (per image / per anchor image / per concept, full intermediate tensors).  They are
the independent expectation in the tests and the baseline in ``benchmarks.bench_losses``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def stochastic_sampling_reference(x: torch.Tensor, order: torch.Tensor, k: int = 4) -> torch.Tensor:
    """Window by window: window w = (b, wr, wc) keeps grid cell (wr*k + o//k, wc*k + o%k), o = order[w]."""
    B, N, D = x.shape
    side = math.isqrt(N)
    g = side // k
    grid = x.view(B, side, side, D)
    out, w = [], 0
    for b in range(B):
        for wr in range(g):
            for wc in range(g):
                o = int(order[w])
                out.append(grid[b, wr * k + o // k, wc * k + o % k])
                w += 1
    return torch.stack(out).view(B, g * g, D)


def modularity_loss_reference(codebook: torch.Tensor, x: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    """Per image: the full (K, n, n) tensor tanh(S_ik S_jk / temp), max over concepts, -trace(W/e @ delta)."""
    x = x.detach()
    c = F.normalize(codebook, dim=1)
    traces = []
    for xb in x:  # (n, D)
        xn = F.normalize(xb, dim=1)
        A = (xn @ xn.T).clamp(min=0)
        A = A - A * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        d = A.sum(dim=1, keepdim=True)  # (n, 1)
        e = A.sum()
        W = A - (d @ d.T) / e
        S = (xn @ c.T).clamp(min=0)  # (n, K)
        E = torch.tanh(S.T.unsqueeze(2) * S.T.unsqueeze(1) / temp)  # (K, n, n)
        delta = E.max(dim=0).values  # (n, n)
        traces.append(torch.trace((W / e) @ delta))
    return -torch.stack(traces).mean()


def contrastive_loss_reference(
    feat: torch.Tensor,
    proj: torch.Tensor,
    proj_ema: torch.Tensor,
    codebook: torch.Tensor,
    bank_index: torch.Tensor,
    bank_proj: torch.Tensor,
    temp: float = 0.07,
    pos_thresh: float = 0.3,
    neg_thresh: float = 0.1,
) -> torch.Tensor:
    """Anchor image by anchor image, against the whole batch then the bank; terms without a
    positive pair are skipped (the published code appends NaN there)."""
    B, n, _ = feat.shape
    cn = F.normalize(codebook, dim=1)
    index = (F.normalize(feat, dim=2) @ cn.T).argmax(dim=2)  # (B, n)
    vq = cn[index]  # (B, n, D) normalised codebook rows
    flat_vq = vq.reshape(B * n, -1)
    s = F.normalize(proj, dim=2)
    t = F.normalize(proj_ema, dim=2).reshape(B * n, -1)
    bank_vq = cn[bank_index]  # (M, D)
    bank_t = F.normalize(bank_proj, dim=1)  # (M, p)

    def term(logits: torch.Tensor, G: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
        keep = pos | (G < neg_thresh)
        shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
        rows = pos.any(dim=1)
        den = (shifted.exp() * keep).sum(dim=1, keepdim=True)
        loss = -shifted[rows] + torch.log(den[rows])
        return loss[pos[rows]].mean() if pos.any() else None

    terms = []
    for b in range(B):
        G = vq[b] @ flat_vq.T  # (n, Bn)
        pos = G > pos_thresh
        for i in range(n):
            pos[i, b * n + i] = False
        terms.append(term(s[b] @ t.T / temp, G, pos))
        if bank_t.shape[0] > 0:
            G_bank = vq[b] @ bank_vq.T  # (n, M)
            terms.append(term(s[b] @ bank_t.T / temp, G_bank, G_bank > pos_thresh))
    kept = [x for x in terms if x is not None]
    return torch.stack(kept).mean() if kept else proj.sum() * 0


class ReferenceBank:
    """The published bank: a list of tensors per concept, grown by concatenation every step and
    flattened by concatenating concept after concept.  Uses the same random draw as ConceptBank."""

    def __init__(self, num_concepts: int, dim: int, capacity: int = 100, device: str | torch.device = "cpu"):
        self.capacity = capacity
        self.bank = {k: torch.empty(0, dim, device=device) for k in range(num_concepts)}

    def update(self, index: torch.Tensor, vectors: torch.Tensor, keep_ratio: float = 0.5,
               generator: torch.Generator | None = None) -> None:
        idx = index.reshape(-1)
        vec = vectors.detach().reshape(idx.numel(), -1)
        priority = torch.randperm(idx.numel(), generator=generator, device=idx.device)
        for k in idx.unique().tolist():
            members = torch.where(idx == k)[0]
            members = members[priority[members].argsort()]
            key = vec[members][: int(len(members) * keep_ratio)]
            stored = torch.cat([self.bank[k], key], dim=0)
            self.bank[k] = stored[len(stored) - self.capacity:] if len(stored) >= self.capacity else stored

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = next(iter(self.bank.values()))
        index = torch.empty(0, dtype=torch.long, device=first.device)
        vectors = first[:0]
        for k, stored in self.bank.items():
            if len(stored) == 0:
                continue
            index = torch.cat([index, torch.full((len(stored),), k, device=stored.device)])
            vectors = torch.cat([vectors, stored], dim=0)
        return index, vectors


def _map_conv(x: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
    return F.conv2d(x, conv.weight, conv.bias)


def mlp_head_reference(head: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """f1(x) + f2(x) in eval mode as the published code runs it: tokens (B, N, D) viewed as a
    (B, D, H, W) map through Conv2d 1x1 branches.  Also the tail of the TR decoder layer."""
    B, N, D = tokens.shape
    side = math.isqrt(N)
    x = tokens.transpose(1, 2).reshape(B, D, side, side)
    out = _map_conv(x, head.f1) + _map_conv(F.relu(_map_conv(x, head.f2[0])), head.f2[2])  # (B, r, H, W)
    return out.flatten(2).transpose(1, 2)


def _single_head_attention(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax((q Wq)(k Wk)^T / sqrt(D)) (v Wv) Wo, sequence-first inputs (L, B, D)."""
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    Q, Kx, V = (F.linear(t, w, b).transpose(0, 1) for t, w, b in ((q, wq, bq), (k, wk, bk), (v, wv, bv)))
    weights = torch.softmax(Q @ Kx.transpose(1, 2) / math.sqrt(Q.shape[-1]), dim=-1)  # (B, Lq, Lk)
    return F.linear((weights @ V).transpose(0, 1), attn.out_proj.weight, attn.out_proj.bias)


def tr_head_reference(head: torch.nn.Module, feat: torch.Tensor) -> torch.Tensor:
    """TR head in eval mode, sequence-first as the published decoder layer runs it."""
    tr = head.tr
    c = head.codebook
    index = (F.normalize(feat, dim=2) @ F.normalize(c, dim=1).T).argmax(dim=2)
    tgt, memory = c[index].transpose(0, 1), feat.transpose(0, 1)  # (N, B, D)
    pos = head.query_pos.unsqueeze(1)  # (N, 1, D)

    def norm(x: torch.Tensor, ln: torch.nn.Module) -> torch.Tensor:
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    tgt = norm(tgt + _single_head_attention(tr.self_attn, tgt + pos, tgt + pos, tgt), tr.norm1)
    tgt = norm(tgt + _single_head_attention(tr.multihead_attn, tgt + pos, memory, memory), tr.norm2)
    tgt = tgt + F.linear(F.relu(F.linear(tgt, tr.linear1.weight, tr.linear1.bias)), tr.linear2.weight, tr.linear2.bias)
    tgt = memory + norm(tgt, tr.norm3)
    return mlp_head_reference(tr, tgt.transpose(0, 1))
