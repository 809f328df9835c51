"""Model Stock: move from the base towards the parents' mean by their task vectors' agreement."""

from __future__ import annotations

import torch
from torch import Tensor

from mergebuild.methods.registry import TensorParams


def model_stock(
    parents: list[Tensor],
    base: Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Interpolate between the base and the parents' mean with t from their cosines.

    cos θ is the mean pairwise cosine similarity of the task vectors ``x_i − b`` — over
    the whole tensor, or per row (vectors along the last dimension) with ``filter_wise``;
    t = N·cos θ / (1 + (N−1)·cos θ) and the result is t·mean(x_i) + (1−t)·b. Where the
    denominator is ~0 (|·| < 1e-6) t is 0, i.e. the base is kept.
    """
    if base is None:
        raise ValueError("model_stock needs a base model")
    if len(parents) < 2:
        raise ValueError(
            f"model_stock needs at least 2 models besides the base, got {len(parents)}"
        )
    shape = base.shape
    count = len(parents)

    if params.globals["filter_wise"]:
        rows = base.reshape(1, -1) if base.dim() <= 1 else base
        views = [p.reshape(rows.shape) for p in parents]
    else:
        rows = base.reshape(-1)
        views = [p.reshape(-1) for p in parents]

    offsets = [v - rows for v in views]
    offset_norms = [o.norm(dim=-1) for o in offsets]
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            norm_product = (offset_norms[i] * offset_norms[j]).clamp(min=1e-6)
            cosines.append((dot / norm_product).clamp(-1.0, 1.0))
    del offsets
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)

    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    t = torch.where(
        singular,
        torch.zeros_like(cos_theta),
        count * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    average = sum(views[1:], views[0].clone()) / count
    return (t * average + (1 - t) * rows).reshape(shape)
