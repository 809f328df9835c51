"""Multi-SLERP: weighted barycentre of any number of models on the hypersphere."""

from __future__ import annotations

import torch
from torch import Tensor

from mergebuild.methods.registry import TensorParams


def multislerp(
    parents: list[Tensor],
    base: Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Interpolate on the unit hypersphere through the tangent space at the mean direction.

    Each (flattened) tensor — or task vector ``x_i − b`` when a base is given — is
    normalised; m is the normalised weighted mean of the unit vectors; the weighted sum of
    their projections onto the tangent space at m is mapped back with the exponential
    map and scaled by Σ w_i‖x_i‖. ``normalize_weights`` (default true) divides the
    weights by their sum first; ``eps`` guards the divisions. A single parent is returned
    as is. When the unit vectors cancel out (m ≈ 0), two parents fall back to the
    weighted linear sum (as mergekit does); more parents are an error.

    Raises:
        ValueError: the weights sum to zero with ``normalize_weights``, or the weighted
            unit vectors of three or more parents cancel out.
    """
    if len(parents) == 1:
        return parents[0]
    normalize_weights = bool(params.globals["normalize_weights"])
    eps = float(params.globals["eps"])
    shape = parents[0].shape

    vectors = torch.stack([p.reshape(-1) for p in parents])
    if base is not None:
        vectors -= base.reshape(-1)

    weights = torch.tensor([float(p["weight"]) for p in params.parents], dtype=vectors.dtype)
    if normalize_weights:
        total = weights.sum()
        if abs(total.item()) < 1e-8:
            raise ValueError(
                f"multislerp weights sum to zero ({weights.tolist()}); they cannot be "
                "normalised — change the weights or set normalize_weights: false"
            )
        weights = weights / total
    column = weights.unsqueeze(1)

    norms = vectors.norm(dim=1, keepdim=True)
    units = vectors / (norms + eps)

    mean = (units * column).sum(dim=0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if len(parents) != 2:
            raise ValueError(
                "multislerp: the weighted unit vectors cancel out (e.g. a and -a with equal "
                "weights), so there is no mean direction; use different weights"
            )
        result = (vectors * column).sum(dim=0)
    else:
        mean = mean / mean_norm
        tangents = units - (units @ mean).unsqueeze(1) * mean
        tangent = (tangents * column).sum(dim=0)
        length = tangent.norm() + eps
        result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
        result = result * (norms.squeeze(1) * weights).sum()

    result = result.reshape(shape)
    if base is not None:
        result = result + base
    return result
