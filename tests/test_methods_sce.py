"""Tests for mergebuild.methods.sce."""

import pytest
import torch
from mergekit_oracle import assert_registry_matches_mergekit, merge, mergekit_merge
from torch.testing import assert_close

from mergebuild.methods.registry import METHODS


def test_energy_weights_and_sign_election():
    # τ1 = [1, -2, 0], τ2 = [3, 1, 0]: energies 5/3 and 10/3 → w = 1/3, 2/3.
    # Elected signs of Σ τ = [4, -1, 0]: +, -, + (zeros never count).
    base = torch.tensor([10.0, 10.0, 10.0])
    parents = [base + torch.tensor([1.0, -2.0, 0.0]), base + torch.tensor([3.0, 1.0, 0.0])]
    out = merge("sce", parents, base)
    assert_close(out, base + torch.tensor([(1 / 3 + 2 / 3 * 3) / 1, -2.0, 0.0]))


def test_select_topk_keeps_the_highest_variance_positions():
    # Variances across the two task vectors: [0, 1, 4, 0.25] (τ = ±d); the top half
    # (k = int(3 non-zero · 0.5) = 1) keeps only position 2.
    base = torch.zeros(4)
    parents = [torch.tensor([1.0, 1.0, 2.0, 0.5]), torch.tensor([1.0, -1.0, -2.0, -0.5])]
    out = merge("sce", parents, base, select_topk=0.5)
    # Only ±2 survive; energies are equal, the elected sign is + (sum 0 ≥ 0).
    assert_close(out, torch.tensor([0.0, 0.0, 2.0, 0.0]))


def test_variance_ties_go_to_the_lowest_index():
    base = torch.zeros(4)
    parents = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([-1.0, -1.0, -1.0, -1.0])]
    out = merge("sce", parents, base, select_topk=0.5)
    assert_close(out, torch.tensor([1.0, 1.0, 0.0, 0.0]))


def test_select_topk_zero_returns_the_base():
    base = torch.tensor([1.0, 2.0])
    out = merge("sce", [torch.tensor([5.0, 5.0]), torch.tensor([0.0, 9.0])], base, select_topk=0.0)
    assert_close(out, base)


def test_no_models_besides_the_base_return_the_base():
    base = torch.tensor([1.0, 2.0])
    assert_close(merge("sce", [], base), base)


def test_registry_entry():
    assert METHODS["sce"].base == "required"
    assert_registry_matches_mergekit("sce")


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.29, 0.0])
def test_matches_mergekit(select_topk):
    # 100 positions: int(100 · 0.29) is 28 in float64 but 29 in mergekit's float32.
    g = torch.Generator().manual_seed(6)
    base = torch.randn(10, 10, generator=g)
    parents = [base + torch.randn(10, 10, generator=g) for _ in range(3)]
    ours = merge("sce", parents, base, select_topk=select_topk)
    theirs = mergekit_merge("sce", parents, base, select_topk=select_topk)
    assert_close(ours, theirs)
