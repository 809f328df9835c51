"""Arcee Fusion: take the parent's changes only at positions of outlying importance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mergebuild.methods.registry import TensorParams

_SOFTMAX_FLOOR = 1e-8


def arcee_fusion(
    parents: list[Tensor],
    base: Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Keep x − b where importance ≥ median + 1.5·IQR of the tensor's importances.

    importance = |x − b| ⊙ KL(softmax(x) ‖ softmax(b)), the KL divergence taken per row
    (along the last dimension, softmax probabilities floored by 1e-8) and broadcast over
    the row. Quartiles are the lower order statistics at ⌊q·(n−1)⌋ of all n importances,
    as mergekit computes them; mergekit samples 1,000,000 random elements of larger
    tensors, we always use all of them, so ours is deterministic.
    """
    if base is None:
        raise ValueError("arcee_fusion needs a base model")
    if len(parents) != 1:
        raise ValueError(f"arcee_fusion needs exactly 1 model besides the base, got {len(parents)}")
    other = parents[0]
    p = F.softmax(other, dim=-1) + _SOFTMAX_FLOOR
    q = F.softmax(base, dim=-1) + _SOFTMAX_FLOOR
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    del p, q
    delta = other - base
    importance = delta.abs() * kl

    q1, median, q3 = _lower_quartiles(importance)
    keep = importance >= median + 1.5 * (q3 - q1)
    return base + delta * keep


def _lower_quartiles(values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Order statistics at ⌊q·(n−1)⌋ (0-based) for q = 1/4, 1/2, 3/4."""
    flat = values.reshape(-1)
    last = flat.numel() - 1
    # kthvalue is 1-based.
    return tuple(
        torch.kthvalue(flat, index + 1).values for index in (last // 4, last // 2, 3 * last // 4)
    )
