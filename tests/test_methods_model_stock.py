"""Tests for mergebuild.methods.model_stock."""

import math

import pytest
import torch
from mergekit_oracle import assert_registry_matches_mergekit, merge, mergekit_merge
from torch.testing import assert_close

from mergebuild.methods.registry import METHODS


def test_identical_parents_are_returned():
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x = torch.tensor([[0.0, 5.0], [1.0, -1.0]])
    assert_close(merge("model_stock", [x, x, x], base), x)


def test_orthogonal_task_vectors_keep_the_base():
    base = torch.tensor([1.0, 1.0])
    out = merge(
        "model_stock", [base + torch.tensor([2.0, 0.0]), base + torch.tensor([0.0, 3.0])], base
    )
    assert_close(out, base)


def test_t_from_the_cosine_of_two_task_vectors():
    # cos θ = 1/√2, t = 2c / (1 + c); mean of the parents = [1, 0.5].
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = merge("model_stock", [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], torch.zeros(2))
    assert_close(out, torch.tensor([t, 0.5 * t]))


def test_three_parents_average_the_pairwise_cosines():
    # Task vectors e1, e1, e2: cosines 1, 0, 0 → c = 1/3, t = 3c / (1 + 2c) = 0.6.
    base = torch.tensor([2.0, 2.0])
    parents = [
        base + torch.tensor([1.0, 0.0]),
        base + torch.tensor([1.0, 0.0]),
        base + torch.tensor([0.0, 1.0]),
    ]
    out = merge("model_stock", parents, base)
    assert_close(out, base + 0.6 * torch.tensor([2 / 3, 1 / 3]))


def test_opposite_task_vectors_keep_the_base():
    # cos θ = -1 makes 1 + (N-1)·cos θ zero: no finite t, so t = 0.
    out = merge(
        "model_stock", [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], torch.zeros(2)
    )
    assert_close(out, torch.zeros(2))


def test_filter_wise_uses_one_cosine_per_row():
    base = torch.zeros(2, 2)
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    x2 = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    out = merge("model_stock", [x1, x2], base, filter_wise=True)
    # Row 0 agrees (t = 1 → mean), row 1 is orthogonal (t = 0 → base).
    assert_close(out, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    whole = merge("model_stock", [x1, x2], base)
    c = 3 / (math.sqrt(2) * math.sqrt(10))
    assert_close(whole, 2 * c / (1 + c) * (x1 + x2) / 2)


def test_needs_two_models_besides_the_base():
    with pytest.raises(ValueError, match="at least 2"):
        merge("model_stock", [torch.ones(2)], torch.zeros(2))


def test_registry_entry():
    method = METHODS["model_stock"]
    assert (method.base, method.min_parents) == ("required", 2)
    assert_registry_matches_mergekit("model_stock")


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(6, 5), (7,)])
def test_matches_mergekit(filter_wise, shape):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g)
    parents = [base + torch.randn(shape, generator=g) + 0.5 for _ in range(3)]
    ours = merge("model_stock", parents, base, filter_wise=filter_wise)
    theirs = mergekit_merge("model_stock", parents, base, filter_wise=filter_wise)
    assert_close(ours, theirs)
