"""RAM and RAM+ (tensor-local): sum task-vector entries unique to one model, average shared ones."""

from __future__ import annotations

import torch
from torch import Tensor

from mergebuild.methods.registry import TensorParams


def ram(
    parents: list[Tensor],
    base: Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Reinforced Agent Merging.

    Entries of τ_i = x_i − b with |τ| > ``epsilon`` are active; per position the active
    entries are averaged (so an entry active in one model only is taken whole).
    """
    if base is None:
        raise ValueError("ram needs a base model")
    if not parents:
        return base
    task_vectors, _, counts = _active_task_vectors(parents, base, params)
    merged = task_vectors.sum(dim=0) / counts.clamp(min=1)
    return base + merged.reshape(base.shape)


def ramplus_tl(
    parents: list[Tensor],
    base: Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """RAM+ (tensor-local): RAM with each model's unique entries scaled up.

    Model i's unique entries are multiplied by λ_i = 1 + r·clamp(ρ_i, 0, α), where
    ρ_i = (its active entries shared with another model) / max(its unique active
    entries, ``epsilon``), counted over this tensor. With ``epsilon`` 0 a model with no
    unique entries (nothing to scale) gets ρ_i = 0 instead of mergekit's 0/0.
    """
    if base is None:
        raise ValueError("ramplus_tl needs a base model")
    if not parents:
        return base
    r = float(params.globals["r"])
    alpha = float(params.globals["alpha"])
    epsilon = float(params.globals["epsilon"])
    task_vectors, active, counts = _active_task_vectors(parents, base, params)

    unique = counts == 1
    shared = counts > 1
    unique_counts = (active & unique).sum(dim=1).to(task_vectors.dtype)
    shared_counts = (active & shared).sum(dim=1).to(task_vectors.dtype)
    denominator = unique_counts.clamp(min=epsilon)
    rho = torch.where(denominator > 0, shared_counts / denominator, torch.zeros_like(denominator))
    scale = 1 + r * rho.clamp(min=0.0, max=alpha)

    unique_part = (task_vectors * unique * scale.unsqueeze(1)).sum(dim=0)
    shared_part = (task_vectors * shared).sum(dim=0) / counts.clamp(min=1)
    return base + (unique_part + shared_part).reshape(base.shape)


def _active_task_vectors(
    parents: list[Tensor], base: Tensor, params: TensorParams
) -> tuple[Tensor, Tensor, Tensor]:
    """Flattened task vectors zeroed where inactive, the active mask, active count per position."""
    epsilon = float(params.globals["epsilon"])
    task_vectors = torch.stack([p.reshape(-1) for p in parents])
    task_vectors -= base.reshape(-1)
    active = task_vectors.abs() > epsilon
    task_vectors *= active
    return task_vectors, active, active.sum(dim=0)
