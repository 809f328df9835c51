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

    The arithmetic is mergekit 0.1.5's, operation for operation: one ``torch.dot`` per unit
    vector and sums accumulated unit by unit in input order. Near-identical parents (norm
    weights ≈ 1) have a dot product that rounds to within one float32 ulp of 1, so the angle
    is either 0 (skipped) or ≈ sqrt(2ε) ≈ 3e-4, which outweighs their tiny differences: any
    other summation order (a stacked matmul) rounds differently and moves the result by a
    large fraction of the task vector.
    """
    if len(parents) == 1:
        return parents[0]
    max_iter = int(params.globals["max_iter"])
    tol = float(params.globals["tol"])
    shape = parents[0].shape
    alphas = [1.0 / len(parents)] * len(parents)

    norms = [torch.linalg.vector_norm(p) for p in parents]
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return torch.zeros(shape, dtype=parents[0].dtype, device=parents[0].device)
    units = [(parents[i] / norms[i]).reshape(-1) for i in valid]
    alpha_sum = sum(alphas[i] for i in valid)
    weights = [alphas[i] / alpha_sum for i in valid]

    mean = torch.zeros_like(units[0])
    for weight, unit in zip(weights, units, strict=True):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, units, strict=True):
            dot = torch.clamp(torch.dot(mean, unit), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue  # already at the mean: its log map is zero
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        step = torch.linalg.vector_norm(tangent)
        if step.item() < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm.item() > tol:
            mean = mean / mean_norm

    scale = sum(alpha * norm for alpha, norm in zip(alphas, norms, strict=True))
    return (scale * mean).reshape(shape)
