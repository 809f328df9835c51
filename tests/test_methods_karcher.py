"""Tests for mergebuild.methods.karcher."""

import math

import pytest
import torch
from mergekit_oracle import assert_registry_matches_mergekit, merge, mergekit_merge
from torch.testing import assert_close

from mergebuild.methods.registry import METHODS


def _at(degrees, norm=1.0):
    r = math.radians(degrees)
    return torch.tensor([norm * math.cos(r), norm * math.sin(r)])


def test_identical_unit_tensors_are_returned():
    x = torch.tensor([[0.6, 0.0], [0.0, 0.8]])
    assert_close(merge("karcher", [x, x, x]), x)


def test_identical_tensors_keep_their_norm():
    x = torch.tensor([3.0, -4.0, 12.0])
    assert_close(merge("karcher", [x, x]), x)


def test_two_orthogonal_tensors_meet_on_the_bisector_at_the_mean_norm():
    out = merge("karcher", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])])
    assert_close(out, _at(45, norm=2.0))


def test_mean_of_angles_on_a_circle():
    # The arithmetic mean of (0°, 0°, 90°) points at atan(1/2) ≈ 26.6°; the geodesic mean is 30°.
    parents = [_at(0), _at(0), _at(90)]
    assert_close(merge("karcher", parents), _at(30))
    assert_close(merge("karcher", parents, max_iter=0), _at(math.degrees(math.atan(0.5))))


def test_zero_tensors_join_the_scale_only():
    out = merge("karcher", [torch.zeros(2), torch.tensor([3.0, 4.0])])
    assert_close(out, torch.tensor([1.5, 2.0]))


def test_all_zero_tensors_give_zeros():
    assert_close(merge("karcher", [torch.zeros(2, 2), torch.zeros(2, 2)]), torch.zeros(2, 2))


def test_registry_entry():
    assert METHODS["karcher"].base == "none"
    assert_registry_matches_mergekit("karcher")


def test_matches_mergekit():
    g = torch.Generator().manual_seed(3)
    parents = [torch.randn(8, 4, generator=g) for _ in range(3)]
    ours = merge("karcher", parents, max_iter=20, tol=1e-6)
    theirs = mergekit_merge("karcher", parents, max_iter=20, tol=1e-6)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_iter", [0, 1, 10])
def test_matches_mergekit_at_each_iteration_count(max_iter):
    g = torch.Generator().manual_seed(4)
    parents = [torch.randn(16, generator=g) for _ in range(4)]
    ours = merge("karcher", parents, max_iter=max_iter)
    theirs = mergekit_merge("karcher", parents, max_iter=max_iter)
    assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spread", [1e-2, 1e-4, 1e-6])
def test_near_identical_float32_norm_weights_match_mergekit_to_two_ulps(spread):
    # LayerNorm weights ≈ 1: the unit vectors' dot products round to within an ulp of 1, so
    # the angles are 0 or ≈ sqrt(2ε) and the summation order decides the result; a stacked
    # matmul was off by up to 69% of the task vector here.
    g = torch.Generator().manual_seed(5)
    base = torch.ones(256)
    parents = [base + spread * torch.randn(256, generator=g) for _ in range(3)]
    ours = merge("karcher", parents)
    theirs = mergekit_merge("karcher", parents)
    ulps = 2 * torch.finfo(torch.float32).eps * theirs.abs()
    assert bool(((ours - theirs).abs() <= ulps).all())
    task_vector_error = (ours - theirs).norm() / (theirs - base).norm()
    assert float(task_vector_error) <= 1e-6


def test_scale_counts_a_vanishing_tensor_as_mergekit_does():
    parents = [torch.full((4,), 1e-7), torch.tensor([1.0, 2.0, 2.0, 4.0])]
    ours = merge("karcher", parents)
    theirs = mergekit_merge("karcher", parents)
    assert_close(ours, theirs, rtol=0, atol=0)
    assert_close(ours, torch.tensor([1.0, 2.0, 2.0, 4.0]) * (5.0 + 2e-7) / 2 / 5.0)
