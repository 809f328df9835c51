"""The engine's NaN/Inf check on bit patterns agrees with ``torch.isfinite`` everywhere."""

from __future__ import annotations

import pytest
import torch

from mergebuild.build.engine import _FINITE_CHUNK, _all_finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern_is_judged_as_isfinite_judges_it(dtype):
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    judged = [_all_finite(torch, patterns[i:i + 1]) for i in range(patterns.numel())]
    assert judged == torch.isfinite(patterns).tolist()
    assert judged.count(False) == (256 if dtype == torch.bfloat16 else 2048)


SPECIALS = [float("nan"), float("inf"), -float("inf"), -0.0, 3.3e38, -1e-45, 65504.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32,
                                   torch.float64])
@pytest.mark.parametrize("value", SPECIALS)
def test_one_special_value_anywhere_in_a_chunked_tensor(dtype, value):
    for where in (0, _FINITE_CHUNK - 1, _FINITE_CHUNK, 2 * _FINITE_CHUNK + 5):
        x = torch.linspace(-2, 2, 2 * _FINITE_CHUNK + 6, dtype=torch.float64).to(dtype)
        x[where] = value
        assert _all_finite(torch, x.view(2, -1)) == bool(torch.isfinite(x).all())


def test_non_contiguous_and_integer_tensors():
    x = torch.zeros(4, 6, dtype=torch.bfloat16)
    x[1, 3] = float("inf")
    assert _all_finite(torch, x[:, ::2]) is True  # the Inf is in a column left out
    assert _all_finite(torch, x[:, ::2].T) is True
    assert _all_finite(torch, x.T) is False
    assert _all_finite(torch, torch.tensor([-1, 2**31 - 1], dtype=torch.int32)) is True


def test_a_span_longer_than_its_scratch_is_still_checked_whole():
    from mergebuild.build.engine import _span_finite

    x = torch.zeros(1000, dtype=torch.bfloat16)
    x[999] = float("inf")
    small = {torch.int16: torch.empty(10, dtype=torch.int16)}
    assert _span_finite(torch, x, small.__getitem__) is False
    assert _span_finite(torch, x[:999], small.__getitem__) is True
    assert _span_finite(torch, x[990:], small.__getitem__) is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32,
                                   torch.float64])
def test_magnitude_is_the_largest_absolute_value_read_off_the_check(dtype):
    from mergebuild.build.engine import _magnitude

    x = torch.linspace(-1, 1, 3 * _FINITE_CHUNK + 7, dtype=torch.float64).to(dtype)
    x[2 * _FINITE_CHUNK + 1] = -7.25  # the largest |x| is negative, in a later chunk
    assert _magnitude(torch, x) == 7.25
    tiny = torch.tensor([0.0, -torch.finfo(dtype).smallest_normal / 4], dtype=dtype)
    assert _magnitude(torch, tiny) == float(tiny.abs().max())  # a subnormal
    assert _magnitude(torch, torch.zeros(5, dtype=dtype)) == 0.0
    assert _magnitude(torch, torch.full((3,), torch.finfo(dtype).max, dtype=dtype)) == (
        torch.finfo(dtype).max)
    for special in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[_FINITE_CHUNK] = special
        assert _magnitude(torch, y) == float("inf")


def test_magnitude_where_the_bit_patterns_cannot_be_read():
    from mergebuild.build.engine import _magnitude

    x = torch.ones(4, 6, dtype=torch.bfloat16)
    assert _magnitude(torch, x[:, ::2]) is None  # finite, its largest |x| not worked out
    x[1, 2] = float("nan")
    assert _magnitude(torch, x[:, ::2]) == float("inf")
    assert _magnitude(torch, torch.tensor([-5, 3])) == 0.0  # not floating: nothing to bound
