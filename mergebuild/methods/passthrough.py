"""Passthrough: one parent's tensor, optionally multiplied by a per-parent ``scale``."""

from __future__ import annotations

import torch

from mergebuild.methods.registry import TensorParams


def merge_passthrough(
    parents: list[torch.Tensor],
    base: torch.Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return the single parent's tensor × ``scale`` (default 1: unchanged).

    Args:
        parents: exactly one float32 tensor (modified in place when scaled).
        base: ignored.
        params: optional per-parent ``scale``.
        generator: unused.

    Returns:
        The float32 tensor.
    """
    if len(parents) != 1:
        raise ValueError(f"passthrough takes exactly one model per tensor, got {len(parents)}")
    scale = params.parents[0].get("scale") if params.parents else None
    x = parents[0]
    if scale is None or float(scale) == 1.0:
        return x
    return x.mul_(float(scale))
