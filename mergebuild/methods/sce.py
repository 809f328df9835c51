"""SCE: select high-variance positions, weight task vectors by energy, erase sign conflicts."""

from __future__ import annotations

import torch
from torch import Tensor

from mergebuild.methods.registry import TensorParams


def sce(
    parents: list[Tensor],
    base: Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Select, Calculate, Erase over the task vectors τ_i = x_i − b.

    Select: with ``select_topk`` < 1, keep only the top fraction of positions (of those
    whose variance across parents is non-zero) by variance, zeroing τ elsewhere
    (``select_topk`` ≤ 0 keeps none). Calculate: w_i = mean(τ_i²) / Σ_j mean(τ_j²)
    (uniform if that sum is < 1e-6). Erase: elect the sign of Σ τ_i per position and drop
    entries of another sign (zeros never count). Result:
    b + Σ w_i·m_i·τ_i / max(Σ w_i·m_i, 1e-6).

    Ties in variance at the selection boundary go to the lowest flat index, so the
    result is deterministic (mergekit leaves them to ``torch.topk``). mergekit's
    ``int8_mask`` only saves memory and is not a parameter here.
    """
    if base is None:
        raise ValueError("sce needs a base model")
    if not parents:
        return base
    select_topk = float(params.globals["select_topk"])

    task_vectors = torch.stack(parents)
    task_vectors -= base
    if select_topk < 1:
        task_vectors *= _variance_mask(task_vectors, select_topk)

    elected = torch.where(task_vectors.sum(dim=0) >= 0, 1.0, -1.0)
    agrees = task_vectors.sign() == elected

    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    energy_sum = energy.sum().item()
    if abs(energy_sum) < 1e-6:
        weights = torch.full_like(energy, 1.0 / energy.shape[0])
    else:
        weights = energy / energy_sum
    kept_weights = weights.reshape(-1, *([1] * base.dim())) * agrees

    merged = (task_vectors * kept_weights).sum(dim=0)
    return base + merged / kept_weights.sum(dim=0).clamp(min=1e-6)


def _variance_mask(task_vectors: Tensor, fraction: float) -> Tensor:
    """1 at the top ``fraction`` of non-zero-variance positions by variance, 0 elsewhere."""
    if fraction <= 0:
        return torch.zeros_like(task_vectors[0])
    variance = torch.var(task_vectors, dim=0, unbiased=False).reshape(-1)
    # float32 product, as mergekit computes it: int(100 * 0.29) is 28 in float64 but 29 here.
    k = int(torch.count_nonzero(variance) * fraction)
    mask = torch.zeros_like(variance)
    if k == 0:
        return mask.reshape(task_vectors.shape[1:])
    kth_largest = torch.topk(variance, k).values[-1]
    above = variance > kth_largest
    missing = k - int(above.sum())
    mask[above] = 1.0
    ties = torch.nonzero(variance == kth_largest).squeeze(1)[:missing]
    mask[ties] = 1.0
    return mask.reshape(task_vectors.shape[1:])
