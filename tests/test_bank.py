"""modules.bank.ConceptBank against the published concatenation bank (benchmarks.reference)."""
import pytest
import torch

from benchmarks.reference import ReferenceBank
from modules.bank import ConceptBank
from utils.errors import UserError


def _assert_same(bank: ConceptBank, ref: ReferenceBank) -> None:
    (i1, v1), (i2, v2) = bank.entries(), ref.entries()
    assert torch.equal(i1, i2) and torch.equal(v1, v2)
    assert len(bank) == len(i2)


@pytest.mark.parametrize("keep_ratio", [0.5, 0.3, 1.0])
def test_matches_reference_over_many_steps(keep_ratio):
    K, p, cap = 9, 4, 6  # small capacity: the FIFO overflows within a few steps
    bank, ref = ConceptBank(K, p, cap), ReferenceBank(K, p, cap)
    g_bank, g_ref, g_data = (torch.Generator().manual_seed(s) for s in (7, 7, 0))
    for _ in range(25):
        index = torch.randint(0, K - 2, (2, 11), generator=g_data)  # concepts 7, 8 never seen
        vectors = torch.randn(2, 11, p, generator=g_data)
        bank.update(index, vectors, keep_ratio, generator=g_bank)
        ref.update(index, vectors, keep_ratio, generator=g_ref)
        _assert_same(bank, ref)
    assert int(bank.fill[K - 2:].sum()) == 0 and int(bank.fill.max()) == cap


def test_fifo_keeps_newest_oldest_first():
    bank = ConceptBank(2, 1, capacity=3)
    for t in range(5):
        bank.update(torch.tensor([[1]]), torch.tensor([[[float(t)]]]), keep_ratio=1.0)
    index, vectors = bank.entries()
    assert index.tolist() == [1, 1, 1] and vectors.flatten().tolist() == [2.0, 3.0, 4.0]


def test_overflow_within_one_update_keeps_newest_capacity():
    bank, ref = ConceptBank(3, 2, capacity=4), ReferenceBank(3, 2, capacity=4)
    index = torch.tensor([[2] * 10 + [0] * 3])
    vectors = torch.randn(1, 13, 2)
    bank.update(index, vectors, 1.0, generator=torch.Generator().manual_seed(1))
    ref.update(index, vectors, 1.0, generator=torch.Generator().manual_seed(1))
    _assert_same(bank, ref)
    assert bank.fill.tolist() == [3, 0, 4]


def test_half_rounds_down_and_keeps_a_subset():
    bank = ConceptBank(4, 1)
    vectors = torch.arange(9.0).view(1, 9, 1)
    bank.update(torch.tensor([[0, 0, 0, 0, 0, 1, 2, 2, 3]]), vectors)
    index, stored = bank.entries()
    assert index.tolist() == [0, 0, 2]  # 5 -> 2, 1 -> 0, 2 -> 1, 1 -> 0
    assert set(stored[:2].flatten().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    assert stored[2].item() in (6.0, 7.0)


def test_empty_bank():
    bank = ConceptBank(5, 3)
    index, vectors = bank.entries()
    assert len(bank) == 0 and index.shape == (0,) and vectors.shape == (0, 3)


def test_state_dict_resume_and_determinism():
    data = torch.Generator().manual_seed(0)
    steps = [(torch.randint(0, 6, (2, 8), generator=data), torch.randn(2, 8, 3, generator=data)) for _ in range(6)]
    a, g_a = ConceptBank(6, 3, capacity=5), torch.Generator().manual_seed(11)
    for index, vectors in steps[:3]:
        a.update(index, vectors, generator=g_a)
    b, g_b = ConceptBank(6, 3, capacity=5), torch.Generator()
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    g_b.set_state(g_a.get_state())
    for index, vectors in steps[3:]:
        a.update(index, vectors, generator=g_a)
        b.update(index, vectors, generator=g_b)
    for x, y in zip(a.entries(), b.entries()):
        assert torch.equal(x, y)
    assert a.to("cpu") is a


def test_bad_input():
    bank = ConceptBank(4, 3, capacity=5)
    with pytest.raises(UserError):
        bank.update(torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3, 2))
    with pytest.raises(UserError):
        bank.update(torch.full((1, 2), 4), torch.randn(1, 2, 3))
    with pytest.raises(UserError):
        bank.load_state_dict(ConceptBank(4, 3, capacity=6).state_dict())
