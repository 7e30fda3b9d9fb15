"""modules.segment: published state-dict layout, forward math, dropout, EMA teachers."""
import pytest
import torch

from benchmarks.reference import mlp_head_reference, tr_head_reference
from modules.segment import Cluster, SegmentMLP, SegmentTR, ema_update
from utils.errors import UserError

# Expected state dicts, written down from the published modules/segment.py and
# modules/segment_module.py (HeadSegment, TRDecoder, Decoder, ProjectionSegment, Cluster), in
# their registration order.  Symbols: D backbone width, Q queries, r=90, p=2048, C=27, K=2048.
_MLP_HEAD = [
    ("f1.weight", ("r", "D", 1, 1)), ("f1.bias", ("r",)),
    ("f2.0.weight", ("D", "D", 1, 1)), ("f2.0.bias", ("D",)),
    ("f2.2.weight", ("r", "D", 1, 1)), ("f2.2.bias", ("r",)),
]
_TR_HEAD = [
    ("query_pos", ("Q", "D")),
    *[(f"tr.{attn}.{name}", shape) for attn in ("self_attn", "multihead_attn") for name, shape in (
        ("in_proj_weight", ("3D", "D")), ("in_proj_bias", ("3D",)),
        ("out_proj.weight", ("D", "D")), ("out_proj.bias", ("D",)))],
    ("tr.linear1.weight", (2048, "D")), ("tr.linear1.bias", (2048,)),
    ("tr.linear2.weight", ("D", 2048)), ("tr.linear2.bias", ("D",)),
    *[(f"tr.norm{i}.{name}", ("D",)) for i in (1, 2, 3) for name in ("weight", "bias")],
    *[(f"tr.{name}", shape) for name, shape in _MLP_HEAD],
]
_PROJECTION = [("f.weight", ("p", "r", 1, 1)), ("f.bias", ("p",))]
_LINEAR = [("linear.f.weight", ("C", "r", 1, 1)), ("linear.f.bias", ("C",))]


def _expected(head: list, D: int, Q: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    sizes = {"D": D, "3D": 3 * D, "Q": Q, "r": 90, "p": 2048, "C": 27}
    keys = [(f"{part}.{name}", shape) for part, entries in (
        ("head", head), ("projection_head", _PROJECTION), ("head_ema", head),
        ("projection_head_ema", _PROJECTION)) for name, shape in entries] + _LINEAR
    return [(k, tuple(sizes.get(s, s) for s in shape)) for k, shape in keys]


def _layout(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


@pytest.mark.parametrize("D", [384, 768])  # ViT-S/8, ViT-B/8 at 320 px: 40 x 40 = 1600 queries
def test_published_key_layout(D):
    mlp, tr = SegmentMLP(D), SegmentTR(D, num_queries=1600)
    assert _layout(mlp) == _expected(_MLP_HEAD, D)
    tr.set_codebook(torch.randn(2048, D))
    assert _layout(tr) == _expected(_TR_HEAD, D, 1600)  # the codebook buffer is not saved
    assert _layout(Cluster(D)) == [("codebook", (2048, D)), ("cluster_probe", (27, 90))]


def test_strict_load_of_published_shaped_dict_round_trips():
    D, Q = 32, 16
    published = {k: torch.randn(shape) for k, shape in _expected(_TR_HEAD, D, Q)}
    tr = SegmentTR(D, Q)
    tr.load_state_dict(published, strict=True)
    for k, v in tr.state_dict().items():
        assert torch.equal(v, published[k])
    again = SegmentTR(D, Q)
    again.load_state_dict(tr.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), tr.state_dict().values()))


def _small_tr(D=16, Q=9, K=5, p=12, C=4) -> SegmentTR:
    tr = SegmentTR(D, Q, reduced_dim=6, projection_dim=p, n_classes=C)
    tr.set_codebook(torch.randn(K, D))
    return tr


def test_forward_shapes():
    feat = torch.randn(2, 9, 16)
    for seg in (SegmentMLP(16, reduced_dim=6, projection_dim=12, n_classes=4), _small_tr()):
        for head, proj in ((seg.head, seg.projection_head), (seg.head_ema, seg.projection_head_ema)):
            r = head(feat)
            assert r.shape == (2, 9, 6) and proj(r).shape == (2, 9, 12)
        assert seg.linear(torch.randn(2, 6, 3, 3)).shape == (2, 4, 3, 3)


def test_heads_equal_published_layout_computation_in_eval():
    feat = torch.randn(2, 9, 16, dtype=torch.float64)
    mlp = SegmentMLP(16, reduced_dim=6, projection_dim=12, n_classes=4).double().eval()
    tr = _small_tr().double().eval()
    assert torch.allclose(mlp.head(feat), mlp_head_reference(mlp.head, feat), atol=1e-10)
    assert torch.allclose(tr.head(feat), tr_head_reference(tr.head, feat), atol=1e-10)
    # a 1x1 conv probe on maps, as the published linear probe
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    assert torch.allclose(mlp.linear(x), torch.nn.functional.conv2d(x, mlp.linear.f.weight, mlp.linear.f.bias))


def test_dropout_only_in_training_and_independent_per_branch():
    feat = torch.randn(2, 9, 16)
    for seg in (SegmentMLP(16, reduced_dim=6, projection_dim=12), _small_tr()):
        seg.eval()
        assert torch.equal(seg.head(feat), seg.head(feat))
        seg.train()
        assert not torch.equal(seg.head(feat), seg.head(feat))
    branch_inputs = []
    mlp = SegmentMLP(16, reduced_dim=6, projection_dim=12).train()
    mlp.head.branch_dropout.register_forward_hook(lambda m, i, o: branch_inputs.append(o))
    mlp.head(feat)
    assert len(branch_inputs) == 2 and not torch.equal(branch_inputs[0], branch_inputs[1])


def test_teacher_starts_equal_never_gets_grad_and_ema_formula():
    seg = _small_tr()
    for s, t in zip(seg.head.parameters(), seg.head_ema.parameters()):
        assert torch.equal(s, t) and not t.requires_grad
    feat = torch.randn(2, 9, 16)
    loss = seg.projection_head(seg.head(feat)).sum() + seg.projection_head_ema(seg.head_ema(feat)).sum()
    loss.backward()
    assert all(p.grad is None for p in [*seg.head_ema.parameters(), *seg.projection_head_ema.parameters()])
    assert all(p.grad is not None for p in seg.head.parameters())

    with torch.no_grad():
        for p in [*seg.head.parameters(), *seg.projection_head.parameters()]:
            p.add_(torch.randn_like(p))
    before = [t.clone() for t in [*seg.head_ema.parameters(), *seg.projection_head_ema.parameters()]]
    students = [*seg.head.parameters(), *seg.projection_head.parameters()]
    seg.ema_update(0.99)
    after = [*seg.head_ema.parameters(), *seg.projection_head_ema.parameters()]
    for t0, s, t1 in zip(before, students, after):
        assert torch.allclose(t1, 0.99 * t0 + 0.01 * s, atol=1e-6)
    assert not any(t.requires_grad for t in after)


def test_ema_update_function():
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = teacher.weight.detach().clone()
    ema_update(teacher, student, decay=0.5)
    assert torch.allclose(teacher.weight, 0.5 * t0 + 0.5 * student.weight)


def test_codebook_errors():
    tr = SegmentTR(16, 9, reduced_dim=6, projection_dim=12)
    with pytest.raises(RuntimeError):
        tr.head(torch.randn(1, 9, 16))  # no codebook yet
    with pytest.raises(UserError):
        tr.set_codebook(torch.randn(5, 15))
    with pytest.raises(UserError):
        SegmentMLP(16).set_codebook(torch.randn(5, 15))
    tr.set_codebook(torch.randn(5, 16))
    with pytest.raises(UserError):
        tr.head(torch.randn(1, 16, 16))  # 16 tokens, head built for 9


def test_cluster_init_ranges():
    c = Cluster(8, reduced_dim=5, num_codebook=64, n_classes=4)
    assert c.codebook.shape == (64, 8) and c.cluster_probe.shape == (4, 5)
    assert c.codebook.abs().max() <= 1 / 64 and c.cluster_probe.abs().max() <= 1 / 4
