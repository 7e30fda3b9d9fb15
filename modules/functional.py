"""The method's math as pure functions: grid sampling, vector quantization, the modularity
loss (stage 1 and 3), the front-door contrastive loss (stage 2) and cluster logits.

Shapes: ``B`` batch, ``N`` tokens (a square grid), ``n`` sampled tokens, ``D`` feature width,
``p`` projection width, ``K`` concepts, ``M`` bank entries, ``C`` classes, ``r`` reduced width.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from utils.errors import UserError

# Working-set limits: the modularity search holds one (B, chunk, n, n) block of concept products;
# the contrastive loss keeps its (anchors, keys) intermediates within the budget and sums the
# scaled keys per concept in blocks of the last size.
MODULARITY_CHUNK_BYTES = 16 * 2**20
CONTRASTIVE_BUDGET_BYTES = 4 * 2**30
KEY_SUM_CHUNK_BYTES = 256 * 2**20


def _square_side(num_tokens: int) -> int:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise UserError(f"expected a square grid of tokens, got N={num_tokens}")
    return side


def _check_codebook(codebook: torch.Tensor, x: torch.Tensor) -> None:
    if codebook.dim() != 2 or codebook.shape[1] != x.shape[-1]:
        raise UserError(f"codebook must have shape (K, {x.shape[-1]}), got {tuple(codebook.shape)}")


def lowp_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of fp16/bf16 tensors as a GPU GEMM computes it: inputs in their dtype, fp32 accumulation,
    the result rounded to their dtype.  On CPU (where such GEMMs are ~100x slower than fp32) the
    accumulation runs as an fp32 GEMM of the same inputs; other dtypes multiply as they are."""
    if a.is_cuda or a.dtype not in (torch.float16, torch.bfloat16):
        return a @ b
    return (a.float() @ b.float()).to(a.dtype)


def stochastic_sampling(
    x: torch.Tensor,
    order: torch.Tensor | None = None,
    k: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep one token per non-overlapping k x k window of the (H, W) token grid.

    Rows/cols that do not fill a window are dropped, so an H x H grid gives (H // k)^2 tokens.
    ``order`` (B * n,) holds, per window (batch-major, then row-major), the row-major position
    ``i * k + j`` inside the window; it is drawn uniformly when not given and is returned so the
    same choice can be replayed on another tensor of the same grid.
    """
    B, N, D = x.shape
    side = _square_side(N)
    g = side // k  # windows per side
    if g == 0:
        raise UserError(f"token grid {side}x{side} is smaller than the {k}x{k} sampling window")
    n = g * g
    if order is None:
        device = generator.device if generator is not None else x.device
        order = torch.randint(k * k, (B * n,), generator=generator, device=device).to(x.device)
    elif order.shape != (B * n,):
        raise UserError(f"sampling order must have shape ({B * n},), got {tuple(order.shape)}")
    o = order.view(B, g, g)
    win = torch.arange(g, device=x.device) * k  # (g,) first row/col of each window
    row = win.view(1, g, 1) + torch.div(o, k, rounding_mode="floor")  # (B, g, g)
    col = win.view(1, 1, g) + o % k  # (B, g, g)
    token = (row * side + col).view(B, n, 1).expand(B, n, D)  # (B, n, D) index into N
    return x.gather(1, token), order


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor,
                    published_fp16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """index = argmax_k cos(z, c_k) (B, N); quantized = c[index], the raw codebook row (B, N, D).

    ``published_fp16``: the cosines are an fp16 product of the fp32-normalised vectors (first index on
    fp16 ties), as the published code's CUDA fp16 autocast computed them."""
    _check_codebook(codebook, z)
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    zn, cn = F.normalize(z.to(dtype), dim=-1), F.normalize(codebook.to(dtype), dim=-1)
    if published_fp16:
        sim = lowp_matmul(zn.float().half(), cn.float().half().T)  # (B, N, K)
    else:
        sim = zn @ cn.T  # (B, N, K)
    index = sim.argmax(dim=-1)  # (B, N)
    return codebook[index], index


def modularity_loss(
    codebook: torch.Tensor, x: torch.Tensor, temp: float = 0.1, chunk_bytes: int = MODULARITY_CHUNK_BYTES,
    published_fp16: bool = False,
) -> torch.Tensor:
    """Negative soft modularity of each image's patch graph under the concept assignment.

    A = relu(cos(x_i, x_j)) with zero diagonal, d = A 1, e = 1^T A 1, W = A - d d^T / e,
    S = relu(cos(x_i, c_k)) (B, n, K), delta_ij = max_k tanh(S_ik S_jk / temp),
    loss = -mean_b sum_ij W_ij delta_ij / e.  ``x`` is detached: only ``codebook`` gets gradient.
    An image without any edge (e = 0) adds 0 (see `_edge_total`).

    tanh is increasing, so delta_ij = tanh(S_ik* S_jk* / temp) with k* the argmax of the products.
    k* is searched without gradient over chunks of concepts (working set (B, chunk, n, n), never
    (B, K, n, n)); delta is then rebuilt from S at k*, so autograd routes the whole gradient of a
    pair to one concept, as max over the materialised tanh tensor does (not amax's even split).
    Ties go to the first index in both; only where distinct products round to the same tanh
    value can the two pick different concepts, and that moves a gradient scaled by
    1 - tanh^2 (exactly 0 once tanh rounds to 1).  Computed in at least fp32, also under
    autocast (the matmuls are small).  ``published_fp16``: the precision of the published code under
    CUDA fp16 autocast instead (see `_modularity_published_fp16`).
    """
    _check_codebook(codebook, x)
    with torch.autocast(x.device.type, enabled=False):
        if published_fp16:
            return _modularity_published_fp16(codebook, x.detach(), temp, chunk_bytes)
        return _modularity(codebook, x.detach(), temp, chunk_bytes)


def _modularity(codebook: torch.Tensor, x: torch.Tensor, temp: float, chunk_bytes: int) -> torch.Tensor:
    dtype = torch.promote_types(torch.promote_types(x.dtype, codebook.dtype), torch.float32)
    codebook, x = codebook.to(dtype), x.to(dtype)
    xn = F.normalize(x, dim=-1)
    adj = (xn @ xn.mT).clamp(min=0)  # (B, n, n)
    adj.diagonal(dim1=1, dim2=2).zero_()
    deg = adj.sum(dim=2, keepdim=True)  # (B, n, 1)
    edges = _edge_total(deg)  # (B, 1, 1)
    w = adj / edges - (deg / edges) * (deg / edges).mT  # (B, n, n) = W / e

    s = (xn @ F.normalize(codebook, dim=-1).T).clamp(min=0)  # (B, n, K)
    best = _argmax_product(s.detach(), chunk_bytes)  # (B, n, n) concept k* of each pair
    s_i = s.gather(2, best)  # (B, n, n): S[b, i, k*_ij]
    s_j = s.gather(2, best.mT).mT  # (B, n, n): S[b, j, k*_ij]
    delta = torch.tanh(s_i * s_j / temp)  # (B, n, n)
    return -(w * delta).sum(dim=(1, 2)).mean()


def _modularity_published_fp16(codebook: torch.Tensor, x: torch.Tensor, temp: float,
                               chunk_bytes: int) -> torch.Tensor:
    """The modularity loss with the dtypes the published code had under CUDA fp16 autocast.

    There F.normalize and sums run in fp32 and every matmul in fp16: A = fp16(xn xn^T) (then fp32
    once its diagonal is removed), d d^T / e^2 is an fp16 product, S = fp16(xn cn^T),
    delta = max_k tanh(fp16(S_ik S_jk) / temp) entirely in fp16 (so pairs tie where tanh rounds to
    1; the first concept wins), each diagonal entry of (W / e) @ delta is rounded to fp16 and the
    trace summed in fp32.
    """
    xn = F.normalize(x.float(), dim=-1).half()  # (B, n, D)
    adj = lowp_matmul(xn, xn.mT).clamp(min=0).float()  # (B, n, n)
    adj.diagonal(dim1=1, dim2=2).zero_()
    deg = adj.sum(dim=2, keepdim=True)  # (B, n, 1)
    edges = _edge_total(deg)  # (B, 1, 1)
    share = (deg / edges).half()  # (B, n, 1)
    w = (adj - lowp_matmul(share, share.mT).float() * edges) / edges  # (B, n, n) = W / e

    s = lowp_matmul(xn, F.normalize(codebook.float(), dim=-1).half().T).clamp(min=0)  # (B, n, K) fp16
    best = _argmax_product(s.detach(), chunk_bytes, lambda prod: torch.tanh(prod / temp))  # (B, n, n)
    s_i = s.gather(2, best)  # (B, n, n)
    s_j = s.gather(2, best.mT).mT  # (B, n, n)
    delta = torch.tanh(s_i * s_j / temp)  # (B, n, n) fp16
    q_diag = (w.half().float() * delta.float()).sum(dim=2).half()  # (B, n): diag((W / e) @ delta) in fp16
    return -q_diag.float().sum(dim=1).mean()


def _edge_total(deg: torch.Tensor) -> torch.Tensor:
    """e = sum of the degrees (B, n, 1) -> (B, 1, 1), kept above 0: an image whose sampled patches have
    no positive affinity (no edge, A = 0) then gets W = 0 and adds 0 to the loss instead of 0 / 0 = NaN
    (the published code's NaN skips the whole step)."""
    return deg.sum(dim=1, keepdim=True).clamp(min=torch.finfo(deg.dtype).tiny)


def _argmax_product(s: torch.Tensor, chunk_bytes: int,
                    score: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """k*_ij = argmax_k score(s_ik s_jk) per image (first index on ties), in chunks of concepts. s: (B, n, K).

    The (B, chunk, n, n) products go into one reused buffer (fresh large blocks cost page faults on CPU).
    ``score`` (default: none) is applied to the products in their dtype before the comparison.
    """
    B, n, K = s.shape
    st = s.transpose(1, 2).contiguous()  # (B, K, n)
    chunk = max(1, min(K, chunk_bytes // max(1, B * n * n * s.element_size())))
    buf = torch.empty(B, chunk, n, n, dtype=s.dtype, device=s.device)
    best_val = torch.full((B, n, n), -1.0, dtype=s.dtype, device=s.device)  # products are >= 0
    best_idx = torch.zeros((B, n, n), dtype=torch.long, device=s.device)
    for k0 in range(0, K, chunk):
        sc = st[:, k0:k0 + chunk]  # (B, c, n)
        out = buf if sc.shape[1] == chunk else None
        prod = torch.mul(sc.unsqueeze(3), sc.unsqueeze(2), out=out)  # (B, c, n, n)
        val, idx = (prod if score is None else score(prod)).max(dim=1)  # (B, n, n)
        better = val > best_val  # strict: an earlier chunk wins ties
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + k0, best_idx)
    return best_idx


def contrastive_loss(
    feat: torch.Tensor,
    proj: torch.Tensor,
    proj_ema: torch.Tensor,
    codebook: torch.Tensor,
    bank_index: torch.Tensor,
    bank_proj: torch.Tensor,
    temp: float = 0.07,
    pos_thresh: float = 0.3,
    neg_thresh: float = 0.1,
    budget_bytes: int = CONTRASTIVE_BUDGET_BYTES,
    published_fp16: bool = False,
) -> torch.Tensor:
    """Front-door contrastive loss of the student against the teacher and the concept bank.

    For anchor patch i (student s_i, concept a_i = vq index of feat_i) and key j (teacher t_j or a
    bank vector, concept a_j): L_ij = cos(s_i, t_j) / temp, G_ij = cos(c_{a_i}, c_{a_j}),
    pos = G > pos_thresh (in-batch: without j = i), neg = G < neg_thresh, and
    l_ij = -L_ij + log sum_k exp(L_ik) [k in pos or neg].  Per anchor image b and key set
    (in-batch, bank when M > 0) the term is the mean of l_ij over positive pairs; a term without
    positive pairs is left out (upstream yields NaN there).  The loss is the mean of the terms.

    All anchors are processed together.  The (anchors, keys) matrices are kept for backward when
    they fit ``budget_bytes``; otherwise they exist only in chunks of rows that fit it, in forward
    and backward alike (backward recomputes them).  Under autocast the two
    (anchors x keys) products run in the autocast dtype, as upstream's do; the rest is fp32.
    ``published_fp16``: as the published code under CUDA fp16 autocast, also the vq index and the
    concept similarities G behind the masks are fp16 products (thresholds compared in fp16), the
    (anchors x keys) products are fp16 whatever the autocast state, and the positive pairs' logits
    in the numerator are those fp16 products (their gradient is the fp32 one of the same sum).
    """
    B, n, _ = feat.shape
    _check_codebook(codebook, feat)
    if proj.shape[:2] != (B, n) or proj_ema.shape != proj.shape:
        raise UserError(f"proj and proj_ema must have shape ({B}, {n}, p), got {tuple(proj.shape)}, "
                        f"{tuple(proj_ema.shape)}")
    if bank_proj.dim() != 2 or bank_proj.shape[1] != proj.shape[2] or bank_index.shape != bank_proj.shape[:1]:
        raise UserError(f"bank must be index (M,) and vectors (M, {proj.shape[2]}), got "
                        f"{tuple(bank_index.shape)} and {tuple(bank_proj.shape)}")
    device = proj.device.type
    dtype = torch.promote_types(proj.dtype, torch.float32)
    mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else dtype
    if published_fp16:
        mm_dtype = torch.float16
    with torch.autocast(device, enabled=False):
        return _contrastive(feat, proj, proj_ema, codebook.detach(), bank_index, bank_proj, temp, pos_thresh,
                            neg_thresh, dtype, mm_dtype, budget_bytes, published_fp16)


def _contrastive(feat: torch.Tensor, proj: torch.Tensor, proj_ema: torch.Tensor, codebook: torch.Tensor,
                 bank_index: torch.Tensor, bank_proj: torch.Tensor, temp: float, pos_thresh: float,
                 neg_thresh: float, dtype: torch.dtype, mm_dtype: torch.dtype, budget_bytes: int,
                 published_fp16: bool) -> torch.Tensor:
    n = feat.shape[1]
    _, index = vector_quantize(feat.detach(), codebook, published_fp16)
    concept = index.flatten()  # (Bn,) anchor concepts
    cn = F.normalize(codebook, dim=-1)
    if published_fp16:
        cn = cn.float().half()
    gram = lowp_matmul(cn, cn.T)  # (K, K): G for every pair of concepts
    pos_k, neg_k = gram > pos_thresh, gram < neg_thresh  # (K, K)
    rows = _AnchorRows(pos_k[concept].to(dtype), ~(pos_k | neg_k)[concept], n, mm_dtype, budget_bytes,
                       product_numerator=published_fp16)

    anchors = F.normalize(proj, dim=-1).flatten(0, 1).to(dtype)  # (Bn, p)
    teacher = F.normalize(proj_ema, dim=-1).flatten(0, 1).to(dtype)  # (Bn, p)
    scale = torch.full((teacher.shape[0],), 1 / temp, dtype=dtype, device=teacher.device)
    num, cnt = rows.terms(anchors, teacher, scale, concept, self_drop=~neg_k[concept, concept])
    if bank_proj.shape[0] > 0:
        bank = bank_proj.detach().to(dtype)  # (M, p), normalised through its column scale
        bank_scale = 1 / (temp * bank.norm(dim=1).clamp(min=1e-12))  # (M,)
        num_b, cnt_b = rows.terms(anchors, bank, bank_scale, bank_index.to(concept.device))
        num, cnt = torch.cat([num, num_b]), torch.cat([cnt, cnt_b])  # (2B,)
    valid = cnt > 0
    terms = torch.where(valid, num / cnt.clamp(min=1), 0.0)
    return terms.sum() / valid.sum().clamp(min=1)


class _AnchorRows:
    """Anchor-side tables of the contrastive loss: per anchor row, which key concepts are positive
    (pos (R, K) as 0/1 floats) and which stay out of the denominator (drop (R, K) bool); ``n``
    anchors per image; ``mm_dtype`` for the (anchors x keys) products. ``product_numerator``: the
    positive pairs' logits summed from those products (the published fp16 rounding of each L_ij)."""

    def __init__(self, pos: torch.Tensor, drop: torch.Tensor, n: int, mm_dtype: torch.dtype, budget_bytes: int,
                 product_numerator: bool = False):
        self.pos, self.drop, self.n, self.mm_dtype, self.budget_bytes = pos, drop, n, mm_dtype, budget_bytes
        self.product_numerator = product_numerator

    def terms(
        self,
        anchors: torch.Tensor,
        keys: torch.Tensor,
        scale: torch.Tensor,
        k_concept: torch.Tensor,
        self_drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per anchor image: (sum over positive pairs of l_ij (B,), number of positive pairs (B,)).

        L_ij = (anchor_i . key_j) scale_j.  Per row, sum_j pos_ij l_ij = P_i log_den_i - sum_j pos_ij L_ij
        with P_i = sum_j pos_ij; the positive sums need only per-concept key sums (K, p).
        ``self_drop`` (R,) marks in-batch keys (key i = anchor i's own patch): that pair is taken
        out of the positives, and out of the denominator where self_drop is set (not a negative).
        """
        K = self.pos.shape[1]
        R, M = anchors.shape[0], keys.shape[0]
        store = R * M * 12 <= self.budget_bytes  # stored exp + backward's product + masks, per (row, key)
        chunk = R if store else max(1, self.budget_bytes // max(1, M * 8))  # logits + mask + cast
        log_den = _MaskedLogSumExp.apply(anchors, keys, scale, self.drop, k_concept, self_drop, self.mm_dtype,
                                         chunk, store)  # (R,)
        key_sums = torch.zeros(K, keys.shape[1], dtype=keys.dtype, device=keys.device)
        step = max(1, min(self.budget_bytes, KEY_SUM_CHUNK_BYTES) // (keys.shape[1] * keys.element_size()))
        for j0 in range(0, keys.shape[0], step):  # (K, p) sum of scaled keys per concept
            key_sums = key_sums.index_add(0, k_concept[j0:j0 + step], keys[j0:j0 + step] * scale[j0:j0 + step, None])
        counts = torch.bincount(k_concept, minlength=K).to(keys.dtype)  # (K,)
        n_pos = self.pos @ counts  # (R,)
        pos_logits = ((anchors @ key_sums.T) * self.pos).sum(dim=1)  # (R,)
        if self_drop is not None:
            own = self.pos.gather(1, k_concept.unsqueeze(1)).squeeze(1)  # (R,) 1 if own pair is positive
            n_pos = n_pos - own
            pos_logits = pos_logits - own * (anchors * keys).sum(dim=1) * scale
        if self.product_numerator:  # the value from the mm_dtype products, the gradient of the same sum
            pos_logits = pos_logits + (self._product_pos_logits(anchors, keys, scale, k_concept, self_drop, chunk)
                                       - pos_logits).detach()
        row = n_pos * log_den - pos_logits  # (R,)
        return row.view(-1, self.n).sum(dim=1), n_pos.view(-1, self.n).sum(dim=1)

    @torch.no_grad()
    def _product_pos_logits(self, anchors: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor,
                            k_concept: torch.Tensor, self_drop: torch.Tensor | None, chunk: int) -> torch.Tensor:
        """sum_j pos_ij L_ij (R,) with each L_ij = (anchor_i . key_j) scale_j from the mm_dtype product, in
        chunks of rows (the own in-batch pair left out, as in `terms`)."""
        q, k = anchors.to(self.mm_dtype), keys.to(self.mm_dtype)
        sums = []
        for r0 in range(0, q.shape[0], chunk):
            logits = lowp_matmul(q[r0:r0 + chunk], k.T).to(scale.dtype).mul_(scale)  # (c, M)
            pos = self.pos[r0:r0 + chunk].index_select(1, k_concept)  # (c, M)
            if self_drop is not None:
                rows = torch.arange(logits.shape[0], device=q.device)
                pos[rows, rows + r0] = 0
            sums.append((logits * pos).sum(dim=1))
        return torch.cat(sums)


class _MaskedLogSumExp(torch.autograd.Function):
    """log_den_i = log sum_j [not drop_ij] exp(L_ij), L = (q @ keys^T) * scale, drop_ij = drop_rows[i, c_j]
    (``self_drop`` (R,) overrides drop_ii for in-batch keys).

    Backward uses dL_ij = g_i P_ij with the masked softmax P_ij = exp(L_ij - log_den_i).  With
    ``store`` the masked exp(L - row max) (R, M) is kept for it; otherwise rows go in chunks and
    backward recomputes each chunk, so no (R, M) tensor outlives its chunk.  Rows with an empty
    denominator return a finite value and get no gradient.  The products q keys^T and dL keys,
    dL^T q run in ``mm_dtype``; everything else in the dtype of ``scale``.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, drop_rows: torch.Tensor,
                k_concept: torch.Tensor, self_drop: torch.Tensor | None, mm_dtype: torch.dtype,
                chunk: int, store: bool) -> torch.Tensor:
        q, keys = q.to(mm_dtype), keys.to(mm_dtype)
        shifts, dens, stored = [], [], []
        for r0 in range(0, q.shape[0], chunk):
            e, drop = _chunk_logits(q, keys, scale, drop_rows, k_concept, self_drop, r0, chunk)
            shift = e.amax(dim=1)  # (c,)
            e.sub_(shift.unsqueeze(1)).exp_().masked_fill_(drop, 0)  # (c, M) masked exp(L - shift)
            shifts.append(shift)
            dens.append(e.sum(dim=1))
            if store:
                stored.append(e)
        shift, den = torch.cat(shifts), torch.cat(dens)  # (R,)
        log_den = den.log() + shift
        # exp(L - inf) = 0: rows with an empty denominator get no gradient
        ctx.save_for_backward(q, keys, scale, drop_rows, k_concept, self_drop, shift,
                              torch.where(den > 0, log_den, torch.inf), *stored)
        ctx.chunk = chunk
        return torch.where(den > 0, log_den, shift)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, keys, scale, drop_rows, k_concept, self_drop, shift, log_den, *stored = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        grad_q = torch.empty(q.shape, dtype=scale.dtype, device=q.device) if need_q else None
        grad_k = torch.zeros(keys.shape, dtype=scale.dtype, device=q.device) if need_k else None
        with torch.autocast(q.device.type, enabled=False):
            for r0 in range(0, q.shape[0], ctx.chunk):
                if stored:  # one chunk: P = stored * exp(shift - log_den)
                    d = stored[0] * ((shift - log_den).exp() * grad).unsqueeze(1)  # (R, M)
                else:
                    d, drop = _chunk_logits(q, keys, scale, drop_rows, k_concept, self_drop, r0, ctx.chunk)
                    r1 = r0 + d.shape[0]
                    d.sub_(log_den[r0:r1, None]).exp_().masked_fill_(drop, 0).mul_(grad[r0:r1, None])
                d = d.mul_(scale).to(q.dtype)  # dL_ij scale_j = g_i P_ij scale_j  (c, M)
                if need_q:
                    grad_q[r0:r0 + d.shape[0]] = lowp_matmul(d, keys)
                if need_k:
                    grad_k += lowp_matmul(d.T, q[r0:r0 + d.shape[0]])
        return grad_q, grad_k, None, None, None, None, None, None, None


def _chunk_logits(q: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, drop_rows: torch.Tensor,
                  k_concept: torch.Tensor, self_drop: torch.Tensor | None, r0: int, chunk: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [r0, r0 + chunk): logits (c, M) in scale's dtype and the mask of keys left out of the
    denominator (c, M)."""
    logits = lowp_matmul(q[r0:r0 + chunk], keys.T).to(scale.dtype).mul_(scale)  # (c, M)
    drop = drop_rows[r0:r0 + chunk].index_select(1, k_concept)  # (c, M)
    if self_drop is not None:
        rows = torch.arange(logits.shape[0], device=q.device)
        drop[rows, rows + r0] = self_drop[r0:r0 + chunk]
    return logits, drop


def cluster_logits(x: torch.Tensor, cluster_probe: torch.Tensor) -> torch.Tensor:
    """cos(x[b, :, h, w], probe_c) for every class: (B, r, H, W), (C, r) -> (B, C, H, W)."""
    if cluster_probe.dim() != 2 or cluster_probe.shape[1] != x.shape[1]:
        raise UserError(f"cluster probe must have shape (C, {x.shape[1]}), got {tuple(cluster_probe.shape)}")
    return torch.einsum("brhw,cr->bchw", F.normalize(x, dim=1), F.normalize(cluster_probe, dim=1))
