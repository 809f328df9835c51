"""Tests for mergebuild.methods.multislerp."""

import math

import pytest
import torch
from mergekit_oracle import assert_registry_matches_mergekit, merge, mergekit_merge
from torch.testing import assert_close

from mergebuild.methods.registry import METHODS

H = math.sqrt(0.5)


def _weights(*values):
    return tuple({"weight": v} for v in values)


def test_single_model_is_returned_unchanged():
    x = torch.tensor([1.0, -2.0])
    assert_close(merge("multislerp", [x], None, _weights(0.3)), x)


def test_two_models_with_equal_weights_give_the_slerp_midpoint():
    out = merge(
        "multislerp", [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])], None, _weights(1, 1)
    )
    assert_close(out, torch.tensor([2 * H, 2 * H]))


def test_unequal_weights_stay_on_the_arc_with_the_weighted_norm():
    x0, x1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    out = merge("multislerp", [x0, x1], None, _weights(3, 1))
    # Norm Σ w_i‖x_i‖ = 0.75·1 + 0.25·3; direction between the two, nearer x0.
    assert_close(out.norm(), torch.tensor(1.5))
    angle = math.atan2(out[1].item(), out[0].item())
    assert 0 < angle < math.pi / 4


def test_three_orthogonal_models_meet_at_the_centre():
    out = merge("multislerp", list(torch.eye(3)), None, _weights(1, 1, 1))
    assert_close(out, torch.full((3,), 1 / math.sqrt(3)))


def test_with_base_interpolates_the_task_vectors():
    base = torch.tensor([[5.0, 5.0]])
    out = merge(
        "multislerp",
        [base + torch.tensor([[1.0, 0.0]]), base + torch.tensor([[0.0, 1.0]])],
        base,
        _weights(1, 1),
    )
    assert_close(out, base + H)


def test_unnormalised_weights_scale_the_result():
    out = merge(
        "multislerp",
        [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])],
        None,
        _weights(2, 2),
        normalize_weights=False,
    )
    assert_close(out, torch.tensor([4 * H, 4 * H]))


def test_two_opposite_models_fall_back_to_the_weighted_sum():
    out = merge(
        "multislerp", [torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.0])], None, _weights(1, 1)
    )
    assert_close(out, torch.tensor([-1.0, 0.0]))


def test_cancelling_directions_of_three_models_are_an_error():
    parents = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 0.0])]
    with pytest.raises(ValueError, match="cancel out"):
        merge("multislerp", parents, None, _weights(1, 1, 1))


def test_weights_summing_to_zero_are_an_error():
    with pytest.raises(ValueError, match="sum to zero"):
        merge("multislerp", [torch.ones(2), torch.zeros(2)], None, _weights(1, -1))


def test_registry_entry():
    assert METHODS["multislerp"].base == "optional"
    assert_registry_matches_mergekit("multislerp")


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_matches_mergekit(with_base, normalize_weights):
    g = torch.Generator().manual_seed(2)
    parents = [torch.randn(6, 5, generator=g) for _ in range(3)]
    base = torch.randn(6, 5, generator=g) if with_base else None
    weights = [0.5, 0.2, 0.8]
    ours = merge(
        "multislerp", parents, base, _weights(*weights), normalize_weights=normalize_weights
    )
    theirs = mergekit_merge(
        "multislerp", parents, base, {"weight": weights}, normalize_weights=normalize_weights
    )
    assert_close(ours, theirs)
