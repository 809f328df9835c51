"""Tests for mergebuild.methods.passthrough: one parent, optionally scaled."""

import pytest
import torch
from torch.testing import assert_close

from mergebuild.methods.passthrough import merge_passthrough
from mergebuild.methods.registry import TensorParams

NAME = "model.layers.3.mlp.down_proj.weight"


def test_returns_the_parent_unchanged_by_default():
    x = torch.tensor([1.0, -2.0])
    assert merge_passthrough([x], None, TensorParams(NAME, {}, ({},)), None) is x
    out = merge_passthrough([x], None, TensorParams(NAME, {}, ({"scale": 1.0},)), None)
    assert_close(out, torch.tensor([1.0, -2.0]))


def test_scale_multiplies():
    out = merge_passthrough(
        [torch.tensor([1.0, -2.0])], None, TensorParams(NAME, {}, ({"scale": 0.5},)), None
    )
    assert_close(out, torch.tensor([0.5, -1.0]))
    out = merge_passthrough(
        [torch.tensor([3.0])], None, TensorParams(NAME, {}, ({"scale": 0.0},)), None
    )
    assert_close(out, torch.tensor([0.0]))


def test_more_than_one_parent_is_an_error():
    with pytest.raises(ValueError, match="exactly one"):
        merge_passthrough(
            [torch.ones(1), torch.ones(1)], None, TensorParams(NAME, {}, ({}, {})), None
        )
