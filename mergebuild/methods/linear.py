"""Linear merge: the weighted average (or weighted sum) of the parents' tensors."""

from __future__ import annotations

import torch

from mergebuild.methods.registry import TensorParams


def merge_linear(
    parents: list[torch.Tensor],
    base: torch.Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Σ w_i·x_i, divided by Σ w_i when ``normalize`` (the default).

    Args:
        parents: float32 tensors of the participating models (modified in place).
        base: ignored; linear takes no base.
        params: per-parent ``weight`` (required); global ``normalize`` (default true).
        generator: unused.

    Returns:
        The merged float32 tensor.

    Raises:
        ValueError: ``normalize`` is on and the weights sum to zero (|Σ w| < 1e-8).

    Example:
        >>> p = TensorParams("w", {}, ({"weight": 1.0}, {"weight": 3.0}))
        >>> merge_linear([torch.tensor([0.0]), torch.tensor([4.0])], None, p)
        tensor([3.])
    """
    weights, normalize, total = _weights(len(parents), params)
    first = parents[0]
    if any(x.data_ptr() == first.data_ptr() for x in parents[1:]) or not first.is_contiguous():
        first = first.clone(memory_format=torch.contiguous_format)
    result = first.mul_(weights[0])
    for x, w in zip(parents[1:], weights[1:]):
        result.add_(x, alpha=w)
    if normalize:
        result.div_(total)
    return result


# The variants are written a sub-span of this many elements at a time: the three float32
# inputs, the result and the output then stay in a core's L2 cache across the variants
# (8 variants of a 256 K-element chunk: ~12 % less time than at once, from L3).
_MANY_SPAN = 1 << 17


def merge_linear_many(
    parents: list[torch.Tensor],
    base: torch.Tensor | None,
    params: list[TensorParams],
    outs: list[torch.Tensor],
    scratch: torch.Tensor,
) -> None:
    """``merge_linear`` for several parameter sets over the same float32 chunks, each result
    cast into its ``outs[i]``: bit for bit, the same operations in the same order, made in
    ``scratch`` instead of in the first parent (which every variant reads).

    Raises:
        ValueError: as ``merge_linear``, for the first parameter set it fails on.
    """
    plans = [_weights(len(parents), p) for p in params]
    n = parents[0].numel()
    for s in range(0, n, _MANY_SPAN):
        e = min(n, s + _MANY_SPAN)
        xs = [x[s:e] for x in parents]
        for (weights, normalize, total), out in zip(plans, outs, strict=True):
            result = torch.mul(xs[0], weights[0], out=scratch[: e - s])
            for x, w in zip(xs[1:], weights[1:]):
                result.add_(x, alpha=w)
            if normalize:
                result.div_(total)
            out[s:e].copy_(result)


def linear_bound(parents: list[float], base: float | None, params: TensorParams) -> float:
    """A bound on every value ``merge_linear`` computes, from each parent's largest |x|:
    Σ|w_i|·max|x_i| bounds the products and the partial sums, that over |Σ w| the result.

    Raises:
        ValueError: as ``merge_linear``, for weights it rejects.

    Example:
        >>> p = TensorParams("w", {}, ({"weight": 1.0}, {"weight": 3.0}))
        >>> linear_bound([2.0, 4.0], None, p)
        14.0
    """
    weights, normalize, total = _weights(len(parents), params)
    summed = sum(abs(w) * m for w, m in zip(weights, parents, strict=True))
    return max(summed, summed / abs(total)) if normalize else summed


def _weights(count: int, params: TensorParams) -> tuple[list[float], bool, float]:
    """The checked weights of ``count`` parents, whether to normalise, and their sum."""
    if not count:
        raise ValueError("linear needs at least one model")
    weights = []
    for index, values in enumerate(params.parents):
        if values.get("weight") is None:
            raise ValueError(f"linear: missing required parameter 'weight' for model {index}")
        weights.append(float(values["weight"]))
    if len(weights) != count:
        raise ValueError(f"linear: {count} models but {len(weights)} weight entries")
    normalize = params.globals.get("normalize", True)
    total = sum(weights)
    if normalize and abs(total) < 1e-8:
        raise ValueError(
            f"linear: the weights {weights} sum to zero, so normalize: true would divide by "
            "zero; change the weights or set normalize: false"
        )
    return weights, normalize, total
