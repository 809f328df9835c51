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
