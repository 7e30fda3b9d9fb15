"""modules.functional against hand-computed cases and the loop references in benchmarks.reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.reference import contrastive_loss_reference, modularity_loss_reference, stochastic_sampling_reference
from modules.functional import (cluster_logits, contrastive_loss, modularity_loss, stochastic_sampling,
                                vector_quantize)
from utils.errors import UserError

F64 = torch.float64


def _grad(loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


# ---------------------------------------------------------------- stochastic sampling

def test_sampling_8x8_known_order():
    x = torch.arange(64.0).view(1, 64, 1)  # token value = its row-major grid index
    out, order = stochastic_sampling(x, order=torch.tensor([0, 5, 10, 15]))
    # windows (0,0),(0,1),(1,0),(1,1); positions (0,0),(1,1),(2,2),(3,3) inside them
    assert out.flatten().tolist() == [0.0, 1 * 8 + 5, 6 * 8 + 2, 7 * 8 + 7]
    assert order.tolist() == [0, 5, 10, 15]


@pytest.mark.parametrize("side,expected", [(40, 100), (20, 25), (23, 25)])
def test_sampling_sizes_and_loop_reference(side, expected):
    x = torch.randn(2, side * side, 3)
    out, order = stochastic_sampling(x)
    assert out.shape == (2, expected, 3)
    assert order.shape == (2 * expected,) and order.dtype == torch.long
    assert 0 <= int(order.min()) and int(order.max()) < 16
    assert torch.equal(out, stochastic_sampling_reference(x, order))


def test_sampling_replay_generator_and_gradient():
    x = torch.randn(2, 400, 5, requires_grad=True)
    y = x.detach() * 3
    out, order = stochastic_sampling(x, generator=torch.Generator().manual_seed(3))
    again, _ = stochastic_sampling(x, generator=torch.Generator().manual_seed(3))
    replay, same = stochastic_sampling(y, order=order)
    assert torch.equal(out, again)
    assert torch.equal(replay, out.detach() * 3) and same is order
    out.sum().backward()
    assert x.grad.sum() == 2 * 25 * 5  # one token per window receives gradient 1 in every channel


def test_sampling_bad_input():
    with pytest.raises(UserError):
        stochastic_sampling(torch.randn(1, 50, 2))  # not a square grid
    with pytest.raises(UserError):
        stochastic_sampling(torch.randn(2, 64, 2), order=torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------- vector quantization

def test_vq_two_concepts():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[[3.0, 1.0], [1.0, 5.0], [-1.0, 0.5]]])
    quantized, index = vector_quantize(z, codebook)
    assert index.tolist() == [[0, 1, 1]]
    assert torch.equal(quantized, torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 2.0]]]))  # raw rows
    with pytest.raises(UserError):
        vector_quantize(z, torch.randn(4, 3))


# ---------------------------------------------------------------- modularity loss

def test_modularity_three_nodes_by_hand():
    a = 1 / math.sqrt(2)
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [a, a]]], dtype=F64)
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    # A = [[0,1,a],[1,0,a],[a,a,0]]; d = (1+a, 1+a, 2a); e = 2 + 4a; W = A - d d^T / e
    d = [1 + a, 1 + a, 2 * a]
    e = 2 + 4 * a
    A = [[0, 1, a], [1, 0, a], [a, a, 0]]
    # S = [(1,0), (1,0), (a,a)]: delta = tanh(10) among nodes 1,2; tanh(10a) to node 3; tanh(10 a^2) on (3,3)
    t1, t13, t33 = math.tanh(10), math.tanh(10 * a), math.tanh(10 * a * a)
    delta = [[t1, t1, t13], [t1, t1, t13], [t13, t13, t33]]
    expected = -sum((A[i][j] - d[i] * d[j] / e) * delta[i][j] for i in range(3) for j in range(3)) / e
    assert modularity_loss(codebook, x).item() == pytest.approx(expected, abs=1e-12)
    assert modularity_loss_reference(codebook, x).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_bytes", [1, 3 * 36 * 36 * 4 * 7, 2**26])  # 1, 7|3, all concepts per chunk
def test_modularity_matches_reference(dtype, tol, chunk_bytes):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 36, 24, generator=g, dtype=dtype)
    codebook = torch.randn(50, 24, generator=g, dtype=dtype)
    codebook[7] = -x[0, 0]  # a concept no patch of image 0 leans to: a concept with no members
    codebook.requires_grad_(True)
    fast = modularity_loss(codebook, x, chunk_bytes=chunk_bytes)
    ref = modularity_loss_reference(codebook, x)
    assert torch.allclose(fast, ref, atol=tol, rtol=0)
    (g_fast,), (g_ref,) = _grad(fast, codebook), _grad(ref, codebook)
    assert torch.allclose(g_fast, g_ref, atol=tol, rtol=0)


@pytest.mark.parametrize("chunk_bytes", [1, 2**26])
def test_modularity_ties_route_gradient_like_reference(chunk_bytes):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, generator=g, dtype=F64)
    base = torch.randn(5, 8, generator=g, dtype=F64)
    codebook = torch.cat([base, base[[1, 3]], 2 * base[[1]]]).requires_grad_(True)  # exact ties
    (g_fast,) = _grad(modularity_loss(codebook, x, chunk_bytes=chunk_bytes), codebook)
    (g_ref,) = _grad(modularity_loss_reference(codebook, x), codebook)
    assert torch.allclose(g_fast, g_ref, atol=1e-12, rtol=0)
    assert g_fast[5:].abs().max() == 0  # the later duplicates never win a tie


@pytest.mark.parametrize("published_fp16", [False, True])
def test_modularity_image_without_edges_adds_zero(published_fp16):
    """Patches with pairwise non-positive cosines (orthogonal axes and their negatives) have no edge:
    that image adds 0 to the batch mean instead of making the loss NaN."""
    torch.manual_seed(0)
    codebook = torch.randn(8, 6, dtype=torch.float32, requires_grad=True)
    edgeless = torch.cat([torch.eye(3), -torch.eye(3)[:1]]).unsqueeze(0)  # (1, 4, 3): cosines 0 or -1
    edgeless = torch.cat([edgeless, torch.zeros(1, 4, 3)], dim=-1)  # (1, 4, 6)
    connected = torch.randn(1, 4, 6).abs()  # all cosines positive
    both = modularity_loss(codebook, torch.cat([connected, edgeless]), published_fp16=published_fp16)
    alone = modularity_loss(codebook, connected, published_fp16=published_fp16)
    assert torch.isfinite(both) and both.item() == pytest.approx(alone.item() / 2, abs=1e-6)
    assert modularity_loss(codebook, edgeless, published_fp16=published_fp16).item() == 0.0
    (grad,) = _grad(both, codebook)
    assert torch.isfinite(grad).all()


def test_modularity_is_fp32_under_autocast_and_mixed_dtypes():
    x = torch.randn(2, 16, 8).bfloat16()
    codebook = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = modularity_loss(codebook, x)
    assert amp.dtype == torch.float32 and torch.equal(amp, modularity_loss(codebook, x.float()))
    assert torch.equal(vector_quantize(x, codebook)[1], vector_quantize(x.float(), codebook)[1])


def test_modularity_gradient_reaches_codebook_only():
    x = torch.randn(2, 16, 8, requires_grad=True)
    codebook = torch.randn(6, 8, requires_grad=True)
    modularity_loss(codebook, x).backward()
    assert x.grad is None and codebook.grad.abs().sum() > 0


# ---------------------------------------------------------------- contrastive loss

def _contrastive_inputs(B=3, n=16, D=12, p=10, K=6, M=40, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(B, n, D, generator=g, dtype=dtype)
    codebook = torch.randn(K, D, generator=g, dtype=dtype)
    proj = torch.randn(B, n, p, generator=g, dtype=dtype, requires_grad=True)
    proj_ema = torch.randn(B, n, p, generator=g, dtype=dtype, requires_grad=True)
    bank_index = torch.randint(K, (M,), generator=g)
    bank_proj = torch.randn(M, p, generator=g, dtype=dtype)
    return feat, proj, proj_ema, codebook, bank_index, bank_proj


@pytest.mark.parametrize("M", [0, 40])
@pytest.mark.parametrize("budget", [1, 2000, 2**30])  # 1 row per chunk, 5-6 rows per chunk, stored
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5)])
def test_contrastive_matches_reference(M, budget, dtype, tol):
    feat, proj, proj_ema, codebook, bank_index, bank_proj = _contrastive_inputs(M=M, dtype=dtype)
    fast = contrastive_loss(feat, proj, proj_ema, codebook, bank_index, bank_proj, budget_bytes=budget)
    ref = contrastive_loss_reference(feat, proj, proj_ema, codebook, bank_index, bank_proj)
    assert torch.allclose(fast, ref, atol=tol, rtol=0)
    for a, b in zip(_grad(fast, proj, proj_ema), _grad(ref, proj, proj_ema)):
        assert torch.allclose(a, b, atol=tol, rtol=0)


def test_contrastive_anchors_without_positives():
    # 8 orthogonal concepts; image 0 holds concepts 0..3 once each (no positive pair anywhere),
    # image 1 holds concept 4 twice and 5, 6 once: only image 1 has in-batch positives.
    eye = torch.eye(8, dtype=F64)
    feat = eye[torch.tensor([[0, 1, 2, 3], [4, 4, 5, 6]])]  # (2, 4, 8)
    _, proj, proj_ema, _, _, _ = _contrastive_inputs(B=2, n=4, p=5)
    bank_index = torch.tensor([0, 0, 7])
    bank_proj = torch.randn(3, 5, dtype=F64)
    for M in (0, 3):
        fast = contrastive_loss(feat, proj, proj_ema, eye, bank_index[:M], bank_proj[:M])
        ref = contrastive_loss_reference(feat, proj, proj_ema, eye, bank_index[:M], bank_proj[:M])
        assert torch.isfinite(fast) and torch.allclose(fast, ref, atol=1e-12)
        for a, b in zip(_grad(fast, proj, proj_ema), _grad(ref, proj, proj_ema)):
            assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-12)


def test_contrastive_no_positive_at_all_is_zero_not_nan():
    eye = torch.eye(8, dtype=F64)
    feat = eye[:8].view(2, 4, 8)  # every patch its own concept
    proj = torch.randn(2, 4, 5, dtype=F64, requires_grad=True)
    loss = contrastive_loss(feat, proj, torch.randn(2, 4, 5, dtype=F64), eye,
                            torch.empty(0, dtype=torch.long), torch.empty(0, 5, dtype=F64))
    loss.backward()
    assert loss.item() == 0 and torch.equal(proj.grad, torch.zeros_like(proj))


def test_contrastive_single_pair_by_hand():
    # Two patches of one concept in one image: anchor i's only positive is the other patch, no
    # negatives; so l = -L_ij + log exp(L_ij) = 0 for both anchors.
    feat = torch.ones(1, 2, 3, dtype=F64)
    proj = torch.randn(1, 2, 4, dtype=F64)
    loss = contrastive_loss(feat, proj, proj, torch.ones(1, 3, dtype=F64),
                            torch.empty(0, dtype=torch.long), torch.empty(0, 4, dtype=F64))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_contrastive_under_autocast_stays_close_to_fp32():
    feat, proj, proj_ema, codebook, bank_index, bank_proj = (
        t.float() if t.is_floating_point() else t for t in _contrastive_inputs(B=2, n=16, p=32, M=40))
    proj = proj.detach().requires_grad_(True)
    exact = contrastive_loss(feat, proj, proj_ema, codebook, bank_index, bank_proj)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = contrastive_loss(feat.bfloat16(), proj, proj_ema, codebook, bank_index, bank_proj)
    assert amp.dtype == torch.float32 and torch.allclose(amp, exact, rtol=0.02)
    (g_amp,), (g_exact,) = _grad(amp, proj), _grad(exact, proj)
    assert torch.isfinite(g_amp).all() and torch.allclose(g_amp, g_exact, atol=0.05 * g_exact.abs().max().item())


def test_contrastive_bad_bank():
    feat, proj, proj_ema, codebook, bank_index, bank_proj = _contrastive_inputs()
    with pytest.raises(UserError):
        contrastive_loss(feat, proj, proj_ema, codebook, bank_index, bank_proj[:, :3])


# ---------------------------------------------------------------- cluster logits

def test_cluster_logits_is_cosine():
    x = torch.randn(2, 5, 3, 4)
    probe = torch.randn(7, 5)
    out = cluster_logits(x, probe)
    assert out.shape == (2, 7, 3, 4)
    expected = F.cosine_similarity(x[1, :, 2, 3].unsqueeze(0), probe, dim=1)  # (7,)
    assert torch.allclose(out[1, :, 2, 3], expected, atol=1e-6)
    with pytest.raises(UserError):
        cluster_logits(x, torch.randn(7, 4))
