"""Karcher mean: the iterative Riemannian (geodesic) mean of the models on the hypersphere."""

from __future__ import annotations

import torch
from torch import Tensor

from mergebuild.methods.registry import TensorParams


def karcher(
    parents: list[Tensor],
    base: Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Equal-weight Karcher mean of the normalised parents, scaled by their mean norm.

    Tensors with norm ≤ ``tol`` take no part in the direction (but still count, as norm
    ~0, in the scale). Starting from the normalised arithmetic mean of the unit vectors
    (or the first unit vector if that mean vanishes), each of at most ``max_iter`` steps
    averages the log maps of the unit vectors at the current mean and follows the
    exponential map, stopping once the step is shorter than ``tol``. All zero inputs
    give zeros. Every listed model participates; a base model only donates config.
    """
    if len(parents) == 1:
        return parents[0]
    max_iter = int(params.globals["max_iter"])
    tol = float(params.globals["tol"])
    shape = parents[0].shape

    vectors = torch.stack([p.reshape(-1) for p in parents])
    norms = vectors.norm(dim=1)
    scale = norms.mean()
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros(shape, dtype=vectors.dtype)
    units = vectors[valid] / norms[valid].unsqueeze(1)
    del vectors
    alpha = 1.0 / units.shape[0]

    mean = units.sum(dim=0) * alpha
    mean_norm = mean.norm()
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm

    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)
        theta = torch.acos(dots)
        # Log map factor θ / sin θ; units already at the mean (θ < tol) contribute nothing.
        factor = torch.where(theta < tol, torch.zeros_like(theta), theta / torch.sin(theta))
        coef = alpha * factor
        tangent = coef @ units - (coef * dots).sum() * mean
        step = tangent.norm()
        if step < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        mean_norm = mean.norm()
        if mean_norm > tol:
            mean = mean / mean_norm

    return (scale * mean).reshape(shape)
