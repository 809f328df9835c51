"""Tests for mergebuild.methods.nearswap."""

import pytest
import torch
from mergekit_oracle import assert_registry_matches_mergekit, merge, mergekit_merge
from torch.testing import assert_close

from mergebuild.methods.registry import METHODS


def test_near_values_are_swapped_and_far_ones_pulled_by_t_over_distance():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    x = torch.tensor([1.05, 1.5, -1.0, 1.0])
    # Distances 0.05, 0.5, 2, 0 → weights 1, 0.2, 0.05, 1.
    out = merge("nearswap", [x], base, t=0.1)
    assert_close(out, torch.tensor([1.05, 1.1, 0.9, 1.0]))


def test_t_zero_returns_the_base():
    base = torch.tensor([[0.5, -2.0], [3.0, 0.0]])
    x = torch.tensor([[0.5001, 7.0], [-3.0, 1e-3]])
    assert_close(merge("nearswap", [x], base, t=0.0), base)


def test_large_t_returns_the_model():
    base = torch.tensor([0.5, -2.0, 3.0])
    x = torch.tensor([4.0, 7.0, -3.0])
    assert_close(merge("nearswap", [x], base, t=100.0), x)


def test_needs_one_model_besides_the_base():
    with pytest.raises(ValueError, match="exactly 1"):
        merge("nearswap", [torch.ones(2), torch.ones(2)], torch.zeros(2), t=0.1)


def test_registry_entry():
    method = METHODS["nearswap"]
    assert (method.base, method.min_parents, method.max_parents) == ("required", 1, 1)
    assert method.param("t").required
    assert_registry_matches_mergekit("nearswap")


def test_matches_mergekit():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(8, 8, generator=g)
    x = base + 0.1 * torch.randn(8, 8, generator=g)
    assert_close(
        merge("nearswap", [x], base, t=0.05), mergekit_merge("nearswap", [x], base, t=0.05)
    )
