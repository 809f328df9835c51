"""Spherical linear interpolation between the base model (t = 0) and one other model."""

from __future__ import annotations

import math

import torch

from mergebuild.methods.registry import TensorParams

_CHUNK_ELEMENTS = 1 << 20
_DOT_THRESHOLD = 0.9995
_NORM_EPS = 1e-8


def slerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[float, float]:
    """Coefficients (c0, c1) with slerp(v0, v1, t) = c0·v0 + c1·v1 over the whole tensor.

    Norms and the dot product are accumulated chunk by chunk in float64, so no full-size
    temporary is created. Nearly collinear tensors (|cos| > 0.9995) fall back to linear
    interpolation; zero tensors (norm ≤ 1e-8) are not normalised, as in mergekit.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    sq0 = sq1 = dot = 0.0
    for s in range(0, a.numel(), _CHUNK_ELEMENTS):
        x, y = a[s : s + _CHUNK_ELEMENTS], b[s : s + _CHUNK_ELEMENTS]
        sq0 += float(torch.dot(x, x))
        sq1 += float(torch.dot(y, y))
        dot += float(torch.dot(x, y))
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    cos = dot / ((n0 if n0 > _NORM_EPS else 1.0) * (n1 if n1 > _NORM_EPS else 1.0))
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > _DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def merge_slerp(
    parents: list[torch.Tensor],
    base: torch.Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SLERP from ``base`` (t = 0) to ``parents[0]`` (t = 1).

    Args:
        parents: exactly one float32 tensor, the non-base model.
        base: the base model's float32 tensor (modified in place and returned).
        params: global ``t`` (required; already resolved for this tensor).
        generator: unused.

    Returns:
        sin((1−t)θ)/sin θ · base + sin(tθ)/sin θ · parent, θ the angle between them.
    """
    if base is None or len(parents) != 1:
        raise ValueError("slerp needs a base model and exactly one other model")
    t = params.globals.get("t")
    if t is None:
        raise ValueError("slerp: missing required parameter 't'")
    t = float(t)
    other = parents[0]
    if not base.is_contiguous() or other.data_ptr() == base.data_ptr():
        base = base.clone(memory_format=torch.contiguous_format)
    c0, c1 = slerp_coefficients(base, other, t)
    return base.mul_(c0).add_(other, alpha=c1)
