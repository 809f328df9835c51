"""Spherical linear interpolation between the base model (t = 0) and one other model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergebuild.methods.chunks import ChunkWorkspace
from mergebuild.methods.registry import TensorParams

_CHUNK_ELEMENTS = 1 << 20
CHUNK_ELEMENTS = _CHUNK_ELEMENTS  # the chunking the dot products are defined over
_DOT_THRESHOLD = 0.9995
_NORM_EPS = 1e-8
# The mix runs over sub-spans of this many elements: a worker's two float32 inputs and its
# result then stay in its core's L2 cache while every variant is written from them (an
# 8-variant mix over whole 1 M-element chunks ran ~15 % slower, from L3).
_MIX_ELEMENTS = 1 << 17
# Where |cos θ| ≤ _DOT_THRESHOLD (the spherical branch), sin θ is at least this much.
_SIN_FLOOR = math.sqrt(1.0 - _DOT_THRESHOLD**2)


def slerp_coefficients(v0: torch.Tensor, v1: torch.Tensor, t: float) -> tuple[float, float]:
    """Coefficients (c0, c1) with slerp(v0, v1, t) = c0·v0 + c1·v1 over the whole tensor.

    The norms and the dot product are taken per ``CHUNK_ELEMENTS`` chunk (float32) and the
    chunk results added in float64 in chunk order, so no full-size temporary is created and
    ``merge_slerp_streamed`` gets the same coefficients on any number of threads. Nearly
    collinear tensors (|cos| > 0.9995) fall back to linear interpolation; zero tensors
    (norm ≤ 1e-8) are not normalised, as in mergekit.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    sums = [_chunk_dots(a[s : s + _CHUNK_ELEMENTS], b[s : s + _CHUNK_ELEMENTS])
            for s in range(0, a.numel(), _CHUNK_ELEMENTS)]
    return _coefficients(sums, t)


def _chunk_dots(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    return float(torch.dot(x, x)), float(torch.dot(y, y)), float(torch.dot(x, y))


def _coefficients(sums: list[tuple[float, float, float]], t: float) -> tuple[float, float]:
    """The coefficients from each chunk's (x·x, y·y, x·y), added in chunk order."""
    sq0 = sq1 = dot = 0.0
    for a, b, c in sums:
        sq0 += a
        sq1 += b
        dot += c
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    cos = dot / ((n0 if n0 > _NORM_EPS else 1.0) * (n1 if n1 > _NORM_EPS else 1.0))
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > _DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def _t(base: object | None, parents: Sequence[object], params: TensorParams) -> float:
    """The interpolation factor, once the inputs (tensors, or their magnitudes) are checked."""
    if base is None or len(parents) != 1:
        raise ValueError("slerp needs a base model and exactly one other model")
    t = params.globals.get("t")
    if t is None:
        raise ValueError("slerp: missing required parameter 't'")
    return float(t)


def slerp_bound(parents: list[float], base: float | None, params: TensorParams) -> float:
    """A bound on every value the SLERP kernels compute, from the largest |x| of the base
    and the other tensor: each chunk's dot products (float32, at most ``CHUNK_ELEMENTS``
    products of two of those) and c0·x + c1·y, whose coefficients are 1−t and t where the
    tensors are nearly collinear, and otherwise sines over sin θ, with sin θ at least
    ``_SIN_FLOOR`` (θ is taken only where |cos θ| ≤ 0.9995): at most ~31.6 each.

    Raises:
        ValueError: as ``merge_slerp``, for a missing base, other model or ``t``.

    Example:
        >>> slerp_bound([2.0], 1.0, TensorParams("w", {"t": 0.5}, ({},)))  # the dots'
        4194304.0
    """
    t, other = _t(base, parents, params), parents[0]
    spherical = 1.0 / _SIN_FLOOR
    mixed = max(abs(1.0 - t), spherical) * base + max(abs(t), spherical) * other
    return max(mixed, _CHUNK_ELEMENTS * max(base, other) ** 2)


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
    t = _t(base, parents, params)
    other = parents[0]
    if not base.is_contiguous() or other.data_ptr() == base.data_ptr():
        base = base.clone(memory_format=torch.contiguous_format)
    c0, c1 = slerp_coefficients(base, other, t)
    return base.mul_(c0).add_(other, alpha=c1)


def merge_slerp_streamed(
    parents: list[torch.Tensor],
    base: torch.Tensor,
    params: TensorParams,
    seed: int | None,
    out: torch.Tensor,
    workspace: ChunkWorkspace,
    consumed=None,
) -> None:
    """``merge_slerp`` over flat CPU tensors of any float dtype (bf16 mmap views, say), a
    chunk at a time on the workspace's threads, written into flat ``out``.

    Bit for bit ``merge_slerp`` cast to ``out``'s dtype: the dot products are taken over the
    same ``_CHUNK_ELEMENTS`` chunks (float32, each chunk on one thread) and added in chunk
    order, and ``c0·x + c1·y`` is elementwise. Memory is two float32 chunks per thread instead
    of two whole float32 tensors.

    Args:
        parents: exactly one flat tensor of ``out``'s length, the non-base model.
        base: flat tensor of ``out``'s length (neither is modified).
        params: global ``t``, the interpolation factor (0 → base); seed: unused.
        out: flat output tensor.
        workspace: a ``ChunkWorkspace`` whose chunk is ``CHUNK_ELEMENTS``; ``consumed(start,
            stop)`` is called once a span of the inputs is read for the last time and the
            output's span written (the mix's sub-spans, ``_MIX_ELEMENTS`` at most).
    """
    t = _t(base, parents, params)
    other = parents[0]
    if workspace.chunk != _CHUNK_ELEMENTS:
        raise ValueError(f"the workspace's chunk must be {_CHUNK_ELEMENTS} elements")
    n = out.numel()
    spans = [(s, min(n, s + _CHUNK_ELEMENTS)) for s in range(0, n, _CHUNK_ELEMENTS)]

    def load(span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = span
        x = workspace.buffer("slerp.base", torch.float32)[: e - s].copy_(base[s:e])
        y = workspace.buffer("slerp.other", torch.float32)[: e - s].copy_(other[s:e])
        return x, y

    c0, c1 = _coefficients(workspace.run(lambda span: _chunk_dots(*load(span)), spans), t)

    def mix(span: tuple[int, int]) -> None:
        for s, e in _sub_spans(span):
            x, y = load((s, e))
            out[s:e].copy_(x.mul_(c0).add_(y, alpha=c1))
            if consumed is not None:
                consumed(s, e)

    workspace.run(mix, spans)


def merge_slerp_streamed_many(
    parents: list[torch.Tensor],
    base: torch.Tensor,
    params: list[TensorParams],
    seeds: list[int | None],
    outs: list[torch.Tensor],
    workspace: ChunkWorkspace,
    consumed=None,
) -> None:
    """``merge_slerp_streamed`` for several ``t`` over the same inputs, in one pass.

    The dot products do not depend on ``t``: they are taken once. Each chunk of the inputs
    is then converted once and every variant's ``c0·x + c1·y`` is written from it, with the
    same operations as the single kernel (so each ``outs[i]`` is bit for bit its result).
    """
    ts = [_t(base, parents, p) for p in params]
    other = parents[0]
    if workspace.chunk != _CHUNK_ELEMENTS:
        raise ValueError(f"the workspace's chunk must be {_CHUNK_ELEMENTS} elements")
    n = outs[0].numel()
    spans = [(s, min(n, s + _CHUNK_ELEMENTS)) for s in range(0, n, _CHUNK_ELEMENTS)]

    def load(span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = span
        x = workspace.buffer("slerp.base", torch.float32)[: e - s].copy_(base[s:e])
        y = workspace.buffer("slerp.other", torch.float32)[: e - s].copy_(other[s:e])
        return x, y

    dots = workspace.run(lambda span: _chunk_dots(*load(span)), spans)
    coefficients = [_coefficients(dots, t) for t in ts]

    def mix(span: tuple[int, int]) -> None:
        for s, e in _sub_spans(span):
            x, y = load((s, e))
            mixed = workspace.buffer("slerp.mixed", torch.float32)[: e - s]
            for out, (c0, c1) in zip(outs, coefficients, strict=True):
                out[s:e].copy_(torch.mul(x, c0, out=mixed).add_(y, alpha=c1))
            if consumed is not None:
                consumed(s, e)

    workspace.run(mix, spans)


def _sub_spans(span: tuple[int, int]) -> list[tuple[int, int]]:
    """A chunk's span in the mix's ``_MIX_ELEMENTS`` sub-spans (elementwise: same bytes)."""
    s, e = span
    return [(a, min(e, a + _MIX_ELEMENTS)) for a in range(s, e, _MIX_ELEMENTS)]
