"""Tests for mergebuild.methods.arcee_fusion."""

import pytest
import torch
from mergekit_oracle import assert_registry_matches_mergekit, merge, mergekit_merge
from torch.testing import assert_close

from mergebuild.methods.registry import METHODS


def test_keeps_changes_above_median_plus_one_and_a_half_iqr():
    # One row, so importance = KL · |x − b| with one KL > 0: the order of |x − b| decides.
    # Sorted diffs 0.1 … 0.8, 5 (n = 9): q1 = 0.3, median = 0.5, q3 = 0.7 → threshold 1.1.
    base = torch.zeros(9)
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 5.0])
    out = merge("arcee_fusion", [x], base)
    assert_close(out, torch.tensor([0.0] * 8 + [5.0]))


def test_a_row_shifted_by_a_constant_has_no_importance():
    # Row 0 moves by 5 everywhere: same softmax, KL 0, so nothing of it is taken.
    # Importances: 8 zeros and c·[0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.7, 4]; q1 = median = 0,
    # q3 = 0.4c → threshold 0.6c.
    base = torch.zeros(2, 8)
    x = torch.stack(
        [torch.full((8,), 5.0), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.7, 4.0])]
    )
    out = merge("arcee_fusion", [x], base)
    expected = torch.zeros(2, 8)
    expected[1, 5:] = torch.tensor([0.65, 0.7, 4.0])
    assert_close(out, expected)


def test_identical_models_return_the_base():
    base = torch.tensor([[0.5, -1.0, 2.0]])
    assert_close(merge("arcee_fusion", [base.clone()], base), base)


def test_needs_one_model_besides_the_base():
    with pytest.raises(ValueError, match="exactly 1"):
        merge("arcee_fusion", [torch.ones(2), torch.ones(2)], torch.zeros(2))


def test_registry_entry():
    method = METHODS["arcee_fusion"]
    assert (method.base, method.min_parents, method.max_parents) == ("required", 1, 1)
    assert_registry_matches_mergekit("arcee_fusion")


@pytest.mark.parametrize("shape", [(16, 12), (50,)])
def test_matches_mergekit(shape):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(shape, generator=g)
    x = base + 0.3 * torch.randn(shape, generator=g)
    assert_close(merge("arcee_fusion", [x], base), mergekit_merge("arcee_fusion", [x], base))
