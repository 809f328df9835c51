"""Tests for mergebuild.methods.task_arithmetic.topk: exact radix-select top-k against a sort reference."""

import pytest
import torch

from mergebuild.methods.task_arithmetic import topk
from mergebuild.methods.task_arithmetic.topk import (
    keep_magnitude_ranks_,
    magnitude_cut,
    top_k_magnitude_mask,
)


def reference_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Top k by |x|, ties by lowest index: a stable descending sort."""
    order = torch.sort(x.abs().reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


def random_tensor(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(n, generator=g)
    if kind == "bf16":  # low 16 bits all zero: every selection happens in the high pass
        return torch.randn(n, generator=g).bfloat16().float()
    if kind == "few_values":  # massive ties, including ±0
        return torch.randint(-3, 4, (n,), generator=g).float()
    if kind == "sparse":
        return torch.randn(n, generator=g) * torch.randint(0, 2, (n,), generator=g)
    raise AssertionError(kind)


@pytest.fixture(params=["radix", "small_tensor_sort"])
def path(request, monkeypatch):
    """Run a test through the radix passes and through the small-tensor sort path."""
    monkeypatch.setattr(topk, "SORT_BELOW", 0 if request.param == "radix" else 1 << 30)
    return request.param


@pytest.mark.parametrize("kind", ["normal", "bf16", "few_values", "sparse"])
def test_mask_equals_sort_reference(path, kind):
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        n = int(torch.randint(1, 4000, (), generator=g))
        k = int(torch.randint(0, n + 1, (), generator=g))
        x = random_tensor(kind, n, g)
        assert torch.equal(top_k_magnitude_mask(x, k), reference_mask(x, k)), (n, k)


@pytest.mark.parametrize("kind", ["bf16", "few_values"])
def test_ties_across_chunk_boundaries(path, monkeypatch, kind):
    monkeypatch.setattr(topk, "CHUNK_ELEMENTS", 7)
    g = torch.Generator().manual_seed(2)
    for _ in range(12):
        n = int(torch.randint(1, 120, (), generator=g))
        x = random_tensor(kind, n, g)
        k = int(torch.randint(0, n + 1, (), generator=g))
        assert torch.equal(top_k_magnitude_mask(x, k), reference_mask(x, k))
        start = int(torch.randint(0, n + 1, (), generator=g))
        stop = int(torch.randint(0, n + 1, (), generator=g))
        expected = x * (reference_mask(x, stop) & ~reference_mask(x, start))
        assert torch.equal(keep_magnitude_ranks_(x.clone(), start, stop), expected)


def test_large_tensor_spanning_chunks_uses_radix(monkeypatch):
    monkeypatch.setattr(topk, "CHUNK_ELEMENTS", 1 << 12)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100_000, generator=g).bfloat16().float()  # > SORT_BELOW, many ties
    for k in (1, 12_345, 99_999):
        assert torch.equal(top_k_magnitude_mask(x, k), reference_mask(x, k))


def test_cut_is_the_kth_largest_magnitude(path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_000, generator=g).bfloat16().float()
    for k in (1, 17, 5000, 10_000):
        cut = magnitude_cut(x, k)
        kth = torch.sort(x.abs(), descending=True).values[k - 1].item()
        assert cut.threshold == kth
        assert cut.ties_kept == k - int((x.abs() > kth).sum())


def test_hand_example_ties_keep_lowest_index(path):
    x = torch.tensor([2.0, -1.0, -2.0, 3.0, 2.0])
    assert top_k_magnitude_mask(x, 2).tolist() == [True, False, False, True, False]
    assert top_k_magnitude_mask(x, 3).tolist() == [True, False, True, True, False]
    cut = magnitude_cut(x, 3)
    assert (cut.threshold, cut.ties_kept) == (2.0, 2)


def test_negative_zero_is_zero_magnitude(path):
    x = torch.tensor([0.0, -0.0, 1.0, -0.0])
    assert top_k_magnitude_mask(x, 2).tolist() == [True, False, True, False]


def test_keep_ranks_in_place_drops_outside_range(path):
    x = torch.tensor([[5.0, -1.0, 4.0], [-3.0, 2.0, -6.0]])
    out = keep_magnitude_ranks_(x, 1, 4)  # ranks: 6→0, 5→1, 4→2, 3→3, 2→4, 1→5
    torch.testing.assert_close(out, torch.tensor([[5.0, 0.0, 4.0], [-3.0, 0.0, 0.0]]))
    assert out.data_ptr() == x.data_ptr()


def test_keep_ranks_non_contiguous_returns_copy():
    x = torch.tensor([[1.0, 4.0], [-3.0, 2.0]]).t()  # values in order: 1, -3, 4, 2
    out = keep_magnitude_ranks_(x, 0, 2)
    torch.testing.assert_close(out, torch.tensor([[0.0, -3.0], [4.0, 0.0]]))


def test_edge_counts():
    x = torch.tensor([1.0, -2.0, 3.0])
    assert top_k_magnitude_mask(x, 0).tolist() == [False] * 3
    assert top_k_magnitude_mask(x, 3).tolist() == [True] * 3
    assert top_k_magnitude_mask(x, 10).tolist() == [True] * 3
    torch.testing.assert_close(keep_magnitude_ranks_(x.clone(), 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="k must be in"):
        magnitude_cut(x, 0)
    with pytest.raises(ValueError, match="k must be in"):
        magnitude_cut(x, 4)


def test_rejects_non_float32():
    with pytest.raises(TypeError, match="float32"):
        top_k_magnitude_mask(torch.ones(3, dtype=torch.bfloat16), 1)
