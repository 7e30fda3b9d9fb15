"""--precision on CPU autocast (every path, so dtype errors show without a GPU), and the published fp16
loss precision of --published_recipe against plain references of the published code's dtypes."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from modules.functional import contrastive_loss, modularity_loss, vector_quantize
from stages.common import Amp
from tests.conftest import cli
from stages.fine_tuning import fine_tune
from stages.front_door import train_front_door
from stages.mediator import train_mediator
from tests.conftest import toy_artifact_dir, toy_codebook_path
from tests.toy_fixtures import flags

CPU = torch.device("cpu")


@pytest.mark.parametrize("precision,dtype", [("auto", None), ("fp32", None), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_precision_on_cpu(precision: str, dtype: torch.dtype | None):
    amp = Amp.for_device(CPU, precision)
    assert amp.dtype == dtype and amp.name == ("fp32" if precision == "auto" else precision)
    assert amp.scaler().is_enabled() == (dtype == torch.float16)  # only fp16 scales the loss
    with amp.autocast():
        out = torch.ones(2, 2) @ torch.ones(2, 2)
    assert out.dtype == (dtype or torch.float32)


def published_modularity_reference(codebook: torch.Tensor, x: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    """The published compute_modularity_based_codebook written out with the dtypes CUDA fp16 autocast
    gives it: F.normalize and sums in fp32, every matmul in fp16, tanh and max on the fp16 products."""
    xn = F.normalize(x.float(), dim=2)
    adj = (xn.half() @ xn.half().transpose(2, 1)).clamp(0)
    adj = adj - adj * torch.eye(adj.shape[1])  # fp16 * fp32 -> fp32
    d = adj.sum(dim=2, keepdim=True)
    e = adj.sum(dim=(1, 2), keepdim=True)
    w = adj - ((d / e).half() @ (d.transpose(2, 1) / e).half()) * e
    c = (xn.half() @ F.normalize(codebook.float(), dim=1).half().T).clamp(0)  # (B, n, K)
    dt = c.transpose(2, 1)  # (B, K, n)
    delta, _ = torch.tanh(dt.unsqueeze(3) @ dt.unsqueeze(2) / temp).max(dim=1)  # (B, n, n)
    q = (w / e).half() @ delta
    return -q.diagonal(dim1=-2, dim2=-1).float().sum(dim=-1).mean()


@pytest.mark.parametrize("chunk_bytes", [1, 2**20])
def test_published_modularity_matches_reference(chunk_bytes: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 12, generator=g)
    codebook = torch.randn(24, 12, generator=g, requires_grad=True)
    ours = modularity_loss(codebook, x, chunk_bytes=chunk_bytes, published_fp16=True)
    (grad,) = torch.autograd.grad(ours, codebook)
    ref = published_modularity_reference(codebook, x)
    (grad_ref,) = torch.autograd.grad(ref, codebook)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, rtol=2e-3, atol=1e-5)
    assert torch.allclose(grad, grad_ref, rtol=1e-2, atol=1e-4)


def test_published_modularity_ties_where_fp16_tanh_rounds_together():
    """Concept 1 is closer than concept 0 to every patch, by products that differ by ~1e-4: in fp32
    concept 1 wins every pair and takes all the gradient; in fp16 the tanh values of some pairs
    round together and the first concept wins them, as the published max over fp16 values does."""
    x = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.3], [0.0, 1.0, 0.0]]])  # (1, 3, 3)
    codebook = torch.tensor([[1.0, 0.012, 0.0], [1.0, 0.0, 0.0119]], requires_grad=True)
    routed = {}
    for published in (False, True):
        (grad,) = torch.autograd.grad(modularity_loss(codebook, x, temp=1.0, published_fp16=published), codebook)
        routed[published] = [bool(grad[k].abs().sum() > 0) for k in range(2)]
    assert routed[False] == [False, True] and routed[True] == [True, True]


def test_published_vq_index_takes_the_first_of_fp16_ties():
    codebook = torch.tensor([[1.0, 0.0], [math.cos(0.002), math.sin(0.002)]])
    z = torch.tensor([[[math.cos(0.0011), math.sin(0.0011)]]])  # closer to concept 1, cosines ~1 - 4e-7
    assert vector_quantize(z, codebook)[1].item() == 1
    assert vector_quantize(z, codebook, published_fp16=True)[1].item() == 0


def test_published_contrastive_masks_compare_in_fp16():
    """Concepts at cosine 0.30002: a positive pair in fp32 (> 0.3), but fp16 rounds the cosine to
    fp16(0.3), which is not > fp16(0.3): the pair is neither positive nor negative there."""
    c1 = torch.tensor([0.30002, math.sqrt(1 - 0.30002 ** 2)])
    codebook = torch.stack([torch.tensor([1.0, 0.0]), c1])  # (2, 2)
    feat = codebook[[0, 0, 1, 1]].unsqueeze(0)  # (1, 4, 2): two patches of each concept
    g = torch.Generator().manual_seed(0)
    proj, proj_ema = torch.randn(1, 4, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, 3))
    fp32 = contrastive_loss(feat, proj, proj_ema, codebook, *empty)
    fp16 = contrastive_loss(feat, proj, proj_ema, codebook, *empty, published_fp16=True)
    # the same loss with the pair of concepts moved out of both masks, computed in fp32
    masked_out = contrastive_loss(feat, proj, proj_ema, codebook, *empty, pos_thresh=0.30003)
    assert torch.allclose(fp16, masked_out, atol=2e-3)
    assert not torch.allclose(fp16, fp32, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("precision,recipe", [("bf16", "false"), ("fp16", "false"), ("fp16", "true")])
def test_every_stage_trains_under_cpu_autocast(precision: str, recipe: str, toy_root, tmp_path):
    """One step of every stage (both heads) under CPU autocast: the default mode in bf16 and fp16, and
    the recipe's own path (fp16 autocast + published fp16 loss math), tiny so CPU half GEMMs stay short."""
    tiny = dict(epoch=1, max_steps=1, precision=precision, published_recipe=recipe, batch_size=2,
                projection_dim=8)
    cli("mediator", None, train_mediator, flags(toy_root, tmp_path, **tiny))
    for stage, structure, body in (("front_door_mlp", "MLP", train_front_door),
                                   ("front_door_tr", "TR", train_front_door), ("fine_tuning_tr", "TR", fine_tune)):
        cli(stage, structure, body, flags(toy_root, tmp_path, val_images=2, **tiny))
    for artifact in (toy_codebook_path(tmp_path), toy_artifact_dir(tmp_path) / "segment_mlp.pth",
                     toy_artifact_dir(tmp_path) / "cluster_tr.pth"):
        settings = json.loads(artifact.with_suffix(".json").read_text())["settings"]
        assert [v for k, v in settings.items() if k.endswith(".precision")][-1] == precision
        assert settings["published_recipe"] is (recipe == "true")
    cluster = torch.load(toy_artifact_dir(tmp_path) / "cluster_tr.pth")
    assert cluster["cluster_probe"].dtype == torch.float32 and torch.isfinite(cluster["cluster_probe"]).all()


def test_published_contrastive_numerator_is_the_fp16_product():
    """Under the recipe the positive pairs' logits in the numerator are the fp16 (anchors x keys) products,
    as published (`-cs_st / temp` at the positive pairs); the reference writes that out for one image
    without a bank: fp16 product, fp32 `/ temp`, log-sum-exp over positives and negatives, mean over
    the positive pairs."""
    g = torch.Generator().manual_seed(0)
    codebook = torch.eye(3, 4)                                   # 3 orthogonal concepts: G = I
    feat = codebook[torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])].unsqueeze(0) + 0.01 * torch.rand(1, 8, 4, generator=g)
    proj, proj_ema = torch.randn(1, 8, 16, generator=g).requires_grad_(), torch.randn(1, 8, 16, generator=g)
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, 16))
    ours = contrastive_loss(feat, proj, proj_ema, codebook, *empty, published_fp16=True)
    (grad,) = torch.autograd.grad(ours, proj)
    (grad_fp32_numerator,) = torch.autograd.grad(contrastive_loss(feat, proj, proj_ema, codebook, *empty), proj)
    torch.testing.assert_close(grad, grad_fp32_numerator, rtol=5e-3, atol=5e-4)  # fp16 rounding only
    proj = proj.detach()

    concept = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    anchors, keys = F.normalize(proj[0], dim=1).half(), F.normalize(proj_ema[0], dim=1).half()
    logits = (anchors.float() @ keys.float().T).half().float() / 0.07    # (8, 8): the fp16 GEMM result
    pos = (concept[:, None] == concept[None, :]) & ~torch.eye(8, dtype=torch.bool)
    neg = concept[:, None] != concept[None, :]
    log_den = torch.logsumexp(logits.masked_fill(~(pos | neg), -torch.inf), dim=1, keepdim=True)
    reference = (log_den - logits)[pos].mean()
    assert abs(ours.item() - reference.item()) < 2e-6
    exact = (log_den - (F.normalize(proj[0], dim=1) @ F.normalize(proj_ema[0], dim=1).T) / 0.07)[pos].mean()
    assert abs(exact.item() - reference.item()) > 1e-4   # the fp16 rounding is visible at this size
