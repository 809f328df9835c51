"""Tests for mergebuild.methods.ram (ram and ramplus_tl)."""

import pytest
import torch
from mergekit_oracle import assert_registry_matches_mergekit, merge, mergekit_merge
from torch.testing import assert_close

from mergebuild.methods.registry import METHODS

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
# τ1 = [1, 2, 0, 1e-6, 0]: position 3 is below epsilon, so inactive.
# τ2 = [3, 0, 0, 5, 7]
PARENTS = [
    BASE + torch.tensor([1.0, 2.0, 0.0, 1e-6, 0.0]),
    BASE + torch.tensor([3.0, 0.0, 0.0, 5.0, 7.0]),
]


def test_ram_sums_unique_entries_and_averages_shared_ones():
    out = merge("ram", PARENTS, BASE)
    assert_close(out, BASE + torch.tensor([2.0, 2.0, 0.0, 5.0, 7.0]))


def test_ramplus_scales_each_models_unique_entries():
    # Model 1: 1 shared / 1 unique → ρ = 1 → λ = 1 + 0.5·1; model 2: 1 / 2 → λ = 1.25.
    out = merge("ramplus_tl", PARENTS, BASE, r=0.5, alpha=1.0)
    assert_close(out, BASE + torch.tensor([2.0, 3.0, 0.0, 6.25, 8.75]))


def test_ramplus_caps_the_ratio_at_alpha():
    # Defaults r 0.1, α 0.2: both ratios (1, 0.5) are capped → λ = 1.02.
    out = merge("ramplus_tl", PARENTS, BASE)
    assert_close(out, BASE + torch.tensor([2.0, 2.04, 0.0, 5.1, 7.14]))


def test_ramplus_with_r_zero_is_ram():
    assert_close(merge("ramplus_tl", PARENTS, BASE, r=0.0), merge("ram", PARENTS, BASE))


def test_ramplus_with_epsilon_zero_and_only_shared_entries_is_finite():
    base = torch.zeros(2)
    parents = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    out = merge("ramplus_tl", parents, base, epsilon=0.0)
    assert_close(out, torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_registry_entry(name):
    assert METHODS[name].base == "required"
    assert_registry_matches_mergekit(name)


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_matches_mergekit(name):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(6, 6, generator=g)
    # Sparse task vectors so that unique, shared and inactive positions all occur.
    parents = [
        base + torch.randn(6, 6, generator=g) * (torch.rand(6, 6, generator=g) < 0.4)
        for _ in range(3)
    ]
    assert_close(merge(name, parents, base), mergekit_merge(name, parents, base))
