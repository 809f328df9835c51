"""Tests for mergebuild.methods.nuslerp."""

import math

import pytest
import torch
from mergekit_oracle import assert_registry_matches_mergekit, merge, mergekit_merge
from torch.testing import assert_close

from mergebuild.methods.registry import METHODS

S = math.sin


def _weights(*values):
    return tuple({"weight": v} for v in values)


def test_equal_weights_of_orthogonal_vectors_give_the_arc_midpoint():
    out = merge(
        "nuslerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], None, _weights(1, 1)
    )
    assert_close(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_t_is_the_second_weight_over_the_sum():
    # t = 1 / (3 + 1) = 0.25 on a quarter circle: sin(0.75·π/2), sin(0.25·π/2).
    out = merge(
        "nuslerp", [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])], None, _weights(3, 1)
    )
    assert_close(out, 2 * torch.tensor([S(3 * math.pi / 8), S(math.pi / 8)]))


def test_weights_summing_to_zero_interpolate_halfway():
    out = merge(
        "nuslerp", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], None, _weights(1, -1)
    )
    assert_close(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))


def test_parallel_vectors_are_interpolated_linearly():
    out = merge(
        "nuslerp", [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], None, _weights(1, 3)
    )
    assert_close(out, torch.tensor([2.5, 5.0]))


def test_with_base_slerps_the_task_vectors():
    base = torch.tensor([1.0, 1.0])
    out = merge(
        "nuslerp", [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0])], base, _weights(1, 1)
    )
    assert_close(out, base + math.sqrt(0.5))


def test_unflattened_interpolates_each_row():
    v0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v1 = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    out = merge("nuslerp", [v0, v1], None, _weights(1, 1), nuslerp_flatten=False)
    # Row 0: orthogonal → arc midpoint; row 1: parallel → linear midpoint.
    assert_close(out, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)], [1.5, 0.0]]))


def test_row_wise_interpolates_along_dim_0():
    v0 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    v1 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = merge(
        "nuslerp", [v0, v1], None, _weights(1, 1), nuslerp_flatten=False, nuslerp_row_wise=True
    )
    # Column 0: [1, 0] and [0, 1] → midpoint; column 1: [0, 0] and [1, 0], θ taken as π/2.
    h = math.sqrt(0.5)
    assert_close(out, torch.tensor([[h, h], [h, 0.0]]))


def test_equal_weights_are_symmetric():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    for flags in (
        {},
        {"nuslerp_flatten": False},
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    ):
        assert_close(
            merge("nuslerp", [a, b], None, _weights(2, 2), **flags),
            merge("nuslerp", [b, a], None, _weights(2, 2), **flags),
        )


def test_needs_two_models():
    with pytest.raises(ValueError, match="exactly 2"):
        merge("nuslerp", [torch.ones(2)], None, _weights(1))


def test_registry_entry():
    method = METHODS["nuslerp"]
    assert (method.base, method.min_parents, method.max_parents) == ("optional", 2, 2)
    assert_registry_matches_mergekit("nuslerp")


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(
    "flags",
    [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}],
)
def test_matches_mergekit(with_base, flags):
    g = torch.Generator().manual_seed(1)
    a, b, base = (torch.randn(5, 7, generator=g) for _ in range(3))
    base = base if with_base else None
    ours = merge("nuslerp", [a, b], base, _weights(0.3, 0.9), **flags)
    theirs = mergekit_merge("nuslerp", [a, b], base, {"weight": [0.3, 0.9]}, **flags)
    assert_close(ours, theirs)


def test_the_same_tensor_object_passed_twice_is_not_corrupted():
    from mergekit_oracle import method_params

    from mergebuild.methods.nuslerp import nuslerp

    x, base = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])
    params = method_params("nuslerp", _weights(1, 1))
    assert_close(nuslerp([x, x], base, params, None), torch.tensor([3.0, 1.0]))
