"""NearSwap: take the parent's value only where it is already close to the base's."""

from __future__ import annotations

import torch
from torch import Tensor

from mergebuild.methods.registry import TensorParams


def nearswap(
    parents: list[Tensor],
    base: Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per element w = clamp(t / max(|b − x|, 1e-6), 0, 1); result = w·x + (1 − w)·b.

    Elements closer than ``t`` are swapped for the parent's; farther ones move towards
    it by t / distance. t → 0 returns the base.
    """
    if base is None:
        raise ValueError("nearswap needs a base model")
    if len(parents) != 1:
        raise ValueError(f"nearswap needs exactly 1 model besides the base, got {len(parents)}")
    t = float(params.globals["t"])
    other = parents[0]
    weight = (t / (base - other).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return weight * other + (1 - weight) * base
