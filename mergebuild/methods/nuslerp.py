"""NuSLERP: spherical interpolation of two models (or their task vectors) by relative weight."""

from __future__ import annotations

import torch
from torch import Tensor

from mergebuild.methods.registry import TensorParams

# A pair counts as colinear when sin²θ = 1 − cos²θ is at most this (mergekit: eps² with eps 1e-8);
# there the spherical formula divides by ~0, so it falls back to the straight line.
_COLINEAR_SIN2 = 1e-16
_NORM_FLOOR = 1e-7


def nuslerp(
    parents: list[Tensor],
    base: Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Slerp between two parents at t = w₂ / (w₁ + w₂) (0.5 when the sum is ~0).

    With a base, the two task vectors ``x_i − b`` are slerped and the base added back.
    ``nuslerp_flatten`` (default true) treats the whole tensor as one vector; otherwise
    each vector runs along the last dimension, or along dim 0 with ``nuslerp_row_wise``
    (mergekit's naming: for a ``[out, in]`` matrix ``row_wise`` interpolates the columns).
    Vectors that are (anti)parallel are interpolated linearly instead.
    """
    if len(parents) != 2:
        raise ValueError(f"nuslerp needs exactly 2 models to interpolate, got {len(parents)}")
    w0, w1 = (float(p["weight"]) for p in params.parents)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total

    v0, v1 = parents
    if base is not None:
        # Out of place: the same tensor object may be passed twice.
        v0 = v0 - base
        v1 = v1 - base

    flatten = bool(params.globals["nuslerp_flatten"]) or v0.dim() == 0
    dim = 0 if params.globals["nuslerp_row_wise"] else -1
    result = _slerp_vectors(t, v0, v1, flatten=flatten, dim=dim)

    if base is not None:
        result = result.add_(base)
    return result


def _slerp_vectors(t: float, v0: Tensor, v1: Tensor, *, flatten: bool, dim: int) -> Tensor:
    """Slerp each pair of vectors along ``dim`` (or of the flattened tensors)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    else:
        v0, v1 = v0.movedim(dim, -1), v1.movedim(dim, -1)

    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=_NORM_FLOOR)
    cos_theta = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1 - cos_theta * cos_theta) <= _COLINEAR_SIN2

    # Colinear entries take a harmless θ = π/2 so the unused spherical branch stays finite.
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos_theta), cos_theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    linear = (1 - t) * v0 + t * v1
    result = torch.where(colinear, linear, spherical)

    if flatten:
        return result.reshape(shape)
    return result.movedim(-1, dim).reshape(shape)
