"""Tests for mergebuild.methods.linear: weighted average of the parents."""

import pytest
import torch
from torch.testing import assert_close

from mergebuild.methods.linear import merge_linear
from mergebuild.methods.registry import TensorParams

NAME = "model.layers.0.self_attn.q_proj.weight"


def run(parents, weights, **globals_):
    params = TensorParams(NAME, globals_, tuple({"weight": w} for w in weights))
    return merge_linear([p.clone() for p in parents], None, params, None)


def test_weighted_average_by_hand():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert_close(run([a, b], [1.0, 3.0]), torch.tensor([2.5, 5.0]))


def test_without_normalize_is_weighted_sum():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert_close(run([a, b], [1.0, 3.0], normalize=False), torch.tensor([10.0, 20.0]))
    assert_close(run([a, b], [2.0, -1.0], normalize=False), torch.tensor([-1.0, -2.0]))


def test_weights_summing_to_one_keep_a_constant_model():
    c = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert_close(run([c, c, c], [0.2, 0.3, 0.5]), c)
    assert_close(run([c, c, c], [0.2, 0.3, 0.5], normalize=False), c)


def test_zero_weight_sum_with_normalize_is_a_value_error():
    with pytest.raises(ValueError, match="sum to zero"):
        run([torch.ones(2), torch.ones(2)], [1.0, -1.0])


def test_missing_weight_is_a_value_error():
    with pytest.raises(ValueError, match="weight"):
        merge_linear([torch.ones(2)], None, TensorParams(NAME, {}, ({},)), None)


def test_same_tensor_passed_twice():
    x = torch.tensor([1.0, 2.0])
    out = merge_linear(
        [x, x], None, TensorParams(NAME, {}, ({"weight": 1.0}, {"weight": 1.0})), None
    )
    assert_close(out, torch.tensor([1.0, 2.0]))


def test_matches_mergekit():
    pytest.importorskip(
        "mergekit.merge_methods.registry", reason="mergekit is not installed: agreement not checked"
    )
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(16, 8, generator=g) for _ in range(3)]
    weights = [0.3, 1.1, 0.6]
    for normalize in (True, False):
        expected = registry.get("linear")(
            [TensorGroup.from_tensors(xs)],
            parameters={"weight": weights, "normalize": normalize},
        )[0]
        assert_close(run(xs, weights, normalize=normalize), expected)


def test_many_is_bit_for_bit_each_variant_alone_and_leaves_the_inputs():
    from mergebuild.methods.linear import _MANY_SPAN, merge_linear_many

    g = torch.Generator().manual_seed(3)
    n = _MANY_SPAN + 4099  # two sub-spans, the second ragged
    parents = [torch.randn(n, generator=g) * 10 ** k for k in (-3, 0, 2)]
    variants = [([0.1, 0.3, 0.2], {}), ([1.0, -0.7, 0.25], {"normalize": False}),
                ([0.5, 0.5, 1e-3], {}), ([3.0, 0.0, -1.0], {})]
    params = [TensorParams(NAME, g_, tuple({"weight": w} for w in ws)) for ws, g_ in variants]
    before = [p.clone() for p in parents]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        outs = [torch.empty(n, dtype=dtype) for _ in variants]
        merge_linear_many(parents, None, params, outs, torch.empty(n))
        for out, p in zip(outs, params, strict=True):
            alone = merge_linear([x.clone() for x in parents], None, p, None).to(dtype)
            assert torch.equal(out.view(torch.uint8), alone.view(torch.uint8))
        assert all(torch.equal(a, b) for a, b in zip(parents, before, strict=True))
    # The same tensor twice (the one parent listed twice) is no in-place hazard either.
    twice = TensorParams(NAME, {}, ({"weight": 2.0}, {"weight": 1.0}))
    out = torch.empty(n)
    merge_linear_many([parents[1], parents[1]], None, [twice], [out], torch.empty(n))
    assert torch.equal(out, merge_linear([parents[1], parents[1]], None, twice, None))
    with pytest.raises(ValueError, match="sum to zero"):
        merge_linear_many(parents[:2], None, [TensorParams(
            NAME, {}, ({"weight": 1.0}, {"weight": -1.0}))], [out], torch.empty(n))


def test_linear_bound_covers_every_value_the_kernel_computes():
    from mergebuild.methods.linear import linear_bound

    p = TensorParams("w", {}, ({"weight": 0.2}, {"weight": 0.3}))
    assert linear_bound([3.0, 4.0], None, p) == pytest.approx(1.8 / 0.5)  # over |Σw|
    raw = TensorParams("w", {"normalize": False}, ({"weight": 2.0}, {"weight": -0.5}))
    assert linear_bound([3.0, 4.0], None, raw) == 8.0
    tiny = TensorParams("w", {}, ({"weight": 0.5}, {"weight": 0.5}))
    assert linear_bound([3.0, 4.0], None, tiny) == 3.5  # the partial sums, not the mean
    for seed in range(20):  # against the kernel itself
        g = torch.Generator().manual_seed(seed)
        xs = [torch.randn(1000, generator=g) * 10 ** float(torch.rand(1, generator=g) * 6)
              for _ in range(3)]
        w = [{"weight": float(v)} for v in torch.randn(3, generator=g)]
        params = TensorParams("w", {}, tuple(w))
        out = merge_linear([x.clone() for x in xs], None, params)
        assert float(out.abs().max()) <= linear_bound(
            [float(x.abs().max()) for x in xs], None, params) * (1 + 1e-6)
    with pytest.raises(ValueError, match="sum to zero"):
        linear_bound([1.0, 1.0], None, TensorParams("w", {}, ({"weight": 1.0},
                                                              {"weight": -1.0})))
