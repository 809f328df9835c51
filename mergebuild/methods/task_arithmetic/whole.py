"""The task-arithmetic family (TIES, DARE, breadcrumbs, DELLA) on whole tensors: one kernel,
each member's knobs read from its ``settings``.

Per output tensor, with δ_i = x_i − b::

    sparsify each δ_i on its own → δ'_i = w_i·δ_i → optional sign consensus → Σ
    → optional normalise → × lambda → b + result

Sparsifiers (planned in ``keep``): ``magnitude`` (TIES: keep the top ``int(density·n)`` by
|δ|, at least one), ``random`` (DARE: Bernoulli keep with p = density), ``magnitude_outliers``
(breadcrumbs: drop the top ``int(gamma·n)``, keep the next ``int(density·n)``), ``della``
(per row: keep with p = density − ε + 2ε·rank/(m−1)). Ties in magnitude are broken by flat
index, lowest first (see ``topk``). All sparsifiers return δ unchanged when density ≥ 1, as
mergekit does.

``rescale`` after sparsifying: ``l1`` (mergekit: × ‖δ‖₁/‖kept‖₁, skipped when either norm
< 1e-7), ``inverse_density`` (DARE paper / PEFT: ÷ density; for DELLA ÷ each element's own
keep probability, as in the DELLA paper), ``none``. Booleans keep mergekit's meaning:
true → ``l1``, false → ``none``.

Randomness comes only from the ``generator`` argument's seed: DARE's mask (since engine
version 2; version 1 drew torch's generator in sequence) and the l1 sums are defined in
``keep``, independent of chunking, threads, device and tensor order. DELLA still draws
torch's CPU generator row block by row block (whole tensors only).
"""

from __future__ import annotations

import math

import torch

from mergebuild.methods.registry import Method, TensorParams
from mergebuild.methods.task_arithmetic.keep import (
    RNG_BLOCK,
    Keep,
    keep_draws,
    l1_blocks,
    l1_factor,
    plan,
)
from mergebuild.methods.task_arithmetic.topk import CHUNK_ELEMENTS, keep_magnitude_ranks_, keep_only_

# Rows of DELLA are ranked a block at a time to bound the sort's scratch memory.
_DELLA_BLOCK_ELEMENTS = 1 << 20


def _l1(x: torch.Tensor) -> float:
    return sum(l1_blocks(x.reshape(-1)))


def _random_keep_(delta: torch.Tensor, density: float, seed: int, parent: int) -> None:
    flat = delta.view(-1)
    for s in range(0, flat.numel(), RNG_BLOCK):
        chunk = flat[s : s + RNG_BLOCK]
        keep_only_(chunk, keep_draws(seed, parent, s, s + chunk.numel(), density).to(chunk.device))


def _della_keep_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    divide_by_probability: bool,
) -> None:
    rows = delta.view(delta.shape[0], -1) if delta.dim() >= 2 else delta.view(1, -1)
    n_rows, width = rows.shape
    if width == 0:
        return
    block = max(1, _DELLA_BLOCK_ELEMENTS // width)
    # Rank r in 0..m-1 of |δ| within its row (ties by column index) scaled to [0, 1];
    # a single-element row gets the middle probability, density.
    step = 2 * epsilon / (width - 1) if width > 1 else 0.0
    low = density - epsilon if width > 1 else density
    ranks = torch.arange(width, dtype=torch.float32, device=delta.device)
    for r0 in range(0, n_rows, block):
        part = rows[r0 : r0 + block]
        order = torch.sort(part.abs(), dim=1, stable=True).indices
        probability = torch.empty_like(part)
        probability.scatter_(1, order, (ranks * step + low).expand_as(part))
        draw = torch.rand(part.shape, generator=generator).to(part.device)
        keep = draw < probability
        if divide_by_probability:
            part.div_(probability)
        keep_only_(part, keep)


def _sparsify_(delta: torch.Tensor, keep: Keep, generator: torch.Generator | None) -> None:
    """Apply one parent's keep plan to its task vector in place (``delta`` is contiguous)."""
    if keep.mode == "all":
        return
    if keep.mode == "zero":
        delta.zero_()
        return
    if keep.mode in ("random", "della") and generator is None:
        raise RuntimeError(f"{keep.mode} sparsification needs a seeded generator")
    before = _l1(delta) if keep.rescale == "l1" else 0.0
    if keep.mode == "ranks":
        keep_magnitude_ranks_(delta, keep.start, keep.stop)
    elif keep.mode == "random":
        _random_keep_(delta, keep.density, generator.initial_seed(), keep.index)
    else:
        _della_keep_(delta, keep.density, keep.epsilon, generator,
                     keep.rescale == "inverse_density")
    if keep.rescale == "l1":
        factor = l1_factor(before, _l1(delta))
        if factor is not None:
            delta.mul_(factor)
    elif keep.rescale == "inverse_density" and keep.mode != "della":
        delta.div_(keep.density)


def _elected_sign(total: torch.Tensor, deltas: list[torch.Tensor], consensus: str) -> torch.Tensor:
    if consensus == "sum":
        votes = total
    elif consensus == "count":
        votes = torch.zeros_like(total)
        for d in deltas:
            votes.add_(torch.sign(d))
    else:
        raise ValueError(f"consensus must be 'sum' or 'count', got {consensus!r}")
    return torch.where(votes >= 0, 1.0, -1.0)


def merge(
    parents: list[torch.Tensor],
    base: torch.Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None = None,
    *,
    method: Method,
) -> torch.Tensor:
    """The family member ``method`` on whole float32 tensors (``base`` is modified in place
    and returned): its ``settings`` choose the sparsifier and the sign consensus."""
    if base is None:
        raise ValueError(f"{method.name} needs a base model")
    if not parents:
        return base
    base = base.contiguous()
    keeps, mix = plan(method, params, base.numel())

    deltas: list[torch.Tensor] = []
    for x, keep in zip(parents, keeps, strict=True):
        if x.data_ptr() == base.data_ptr() or any(x.data_ptr() == d.data_ptr() for d in deltas):
            x = x.clone()  # the same model listed twice: never subtract in place from an alias
        delta = x.contiguous().sub_(base)
        _sparsify_(delta, keep, generator)
        delta.mul_(keep.weight)
        deltas.append(delta.view(-1))

    weights = [keep.weight for keep in keeps]
    out = base.view(-1)
    for s in range(0, out.numel(), CHUNK_ELEMENTS):
        parts = [d[s : s + CHUNK_ELEMENTS] for d in deltas]
        out[s : s + CHUNK_ELEMENTS].add_(mix_(parts, weights, mix.consensus, mix.normalize,
                                              mix.lam))
    return base


_ONE_BITS = 0x3F80_0000  # 1.0 as float32


def mix_(
    parts: list[torch.Tensor],
    weights: list[float],
    consensus: str | None,
    normalize: bool,
    lam: float,
    scratch=None,
    *,
    signs: list[torch.Tensor | None] | None = None,
    ones: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """``λ·mix(parts)`` elementwise: the weighted, sparsified task vectors of one span
    (read, never modified: a sweep's variants may share them) → optional sign consensus →
    sum → optional normalise → × λ, in a buffer of ``scratch``.

    ``scratch(name, dtype)``, if given, returns a reused buffer of at least the span's
    length. The "sum" consensus runs on sign bits (no bool tensors, which are slow to make
    on CPU); it gives the same bits as the plain formulation (``_mix_reference_``), which
    handles spans whose sum is not finite (NaN and inf votes). ``signs[i]``, where given,
    is ``torch.sign(parts[i])`` already made (shared by variants), and ``ones`` and
    ``zeros`` spans of 1.0 and +0.0 at least as long: the same bits with fewer passes.
    """
    n = parts[0].numel()

    def buffer(name: str, dtype: torch.dtype) -> torch.Tensor:
        if scratch is None:
            return torch.empty(n, dtype=dtype, device=parts[0].device)
        return scratch(name, dtype)[:n]

    plain_divisor = _plain_divisor(weights)
    mixed = buffer("mix", torch.float32)
    torch.add(parts[0], parts[1], out=mixed) if len(parts) > 1 else mixed.copy_(parts[0])
    for p in parts[2:]:
        mixed.add_(p)
    if consensus is None:
        if normalize:
            mixed.div_(plain_divisor)
    elif consensus != "sum" or not math.isfinite(float(mixed.sum())):
        mixed = _mix_reference_(mixed, parts, weights, consensus, normalize)
    else:
        # elected = +1 where Σ ≥ 0 else −1, as copysign(1, Σ) (a −0.0 sum only arises when
        # every part is ±0, and a zero part agrees with neither sign); agree = relu(sign(p)·e)
        # is 1.0 where sign(p) equals it, else 0.0; p·agree keeps p or gives ±0.
        elected = buffer("elected", torch.float32)
        if ones is None:
            elected.fill_(1.0)
            torch.copysign(elected, mixed, out=elected)
        else:
            torch.copysign(ones[:n], mixed, out=elected)
        kept = buffer("kept", torch.float32)
        divisor = buffer("divisor", torch.float32) if normalize else None
        if zeros is None:
            kept.zero_()
            if divisor is not None:
                divisor.zero_()
        agree = buffer("agree", torch.float32)
        for i, (p, w) in enumerate(zip(parts, weights)):
            sign = signs[i] if signs is not None else None
            if sign is None:
                torch.sign(p, out=agree).mul_(elected).clamp_min_(0.0)
            else:
                torch.mul(sign, elected, out=agree).clamp_min_(0.0)
            if i == 0 and zeros is not None:  # +0.0 + p·agree, as on a zeroed buffer
                torch.addcmul(zeros[:n], p, agree, out=kept)
                if divisor is not None:
                    torch.add(zeros[:n], agree, alpha=w, out=divisor)
                continue
            kept.addcmul_(p, agree)
            if divisor is not None:
                divisor.add_(agree, alpha=w)
        if divisor is not None:
            # 0 → 1, the rest unchanged: add 1.0 where |divisor| is 0 and +0.0 elsewhere
            # (the bits of 1.0 where (|bits| − 1) >> 31 is −1); bool tensors are slow to make.
            one_where_zero = buffer("zero", torch.int32)
            torch.bitwise_and(divisor.view(torch.int32), 0x7FFF_FFFF, out=one_where_zero)
            one_where_zero.sub_(1).bitwise_right_shift_(31).bitwise_and_(_ONE_BITS)
            divisor.add_(one_where_zero.view(torch.float32))
            kept.div_(divisor)
        mixed = kept
    if lam != 1:
        mixed.mul_(lam)
    return mixed


def _plain_divisor(weights: list[float]) -> float:
    """What normalising without consensus divides by: Σ w, or 1 where it is ~0."""
    total = sum(weights)
    return 1.0 if abs(total) < 1e-8 else total


def _mix_reference_(
    total: torch.Tensor,
    parts: list[torch.Tensor],
    weights: list[float],
    consensus: str,
    normalize: bool,
) -> torch.Tensor:
    """Sign consensus written plainly: keep the parts whose sign is the elected one."""
    elected = _elected_sign(total, parts, consensus)
    mixed = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for p, w in zip(parts, weights):
        agrees = torch.sign(p) == elected
        mixed.add_(torch.where(agrees, p, 0.0))  # keep_only_'s bits, p left as it is
        divisor.add_(agrees, alpha=w)
    if normalize:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return mixed


def bound(parents: list[float], base: float | None, params: TensorParams, *,
          method: Method) -> float | None:
    """A bound on every value the family's kernels compute, from the largest |x| of each
    parent's tensor and of the base's: |δ_i| ≤ max|x_i| + max|b|; a kept element is
    rescaled by at most 1/density (``inverse_density``; DELLA: 1/(density − ε), its lowest
    keep probability) and weighted; their sum bounds the mix, which normalising divides by
    |Σ w| (or, with sign consensus and no negative weight, turns into a weighted mean of
    the agreeing parts: at most the largest rescaled |δ_i|); then × |λ|, + max|b|.

    None where no bound holds: an ``l1`` rescale (its factor ‖δ‖₁/‖kept‖₁ is unbounded) or
    a consensus normalised by weights of both signs (the agreeing ones may nearly cancel).

    Raises:
        ValueError: as the kernels, for a missing base or parameters they reject.
    """
    if base is None:
        raise ValueError(f"{method.name} needs a base model")
    keeps, mix = plan(method, params, 1 << 40)  # any size: the rescales do not depend on it
    deltas = [largest + base for largest in parents]
    rescaled = []
    for keep, delta in zip(keeps, deltas, strict=True):
        if keep.mode == "zero":
            rescaled.append(0.0)
        elif keep.mode == "all" or keep.rescale == "none":
            rescaled.append(delta)
        elif keep.rescale == "inverse_density":
            rescaled.append(delta / (keep.density - keep.epsilon))
        else:
            return None
    summed = sum(abs(k.weight) * r for k, r in zip(keeps, rescaled, strict=True))
    if not mix.normalize:
        mixed = summed
    elif mix.consensus is None:
        mixed = summed / abs(_plain_divisor([k.weight for k in keeps]))
    elif all(k.weight >= 0 for k in keeps):
        mixed = max(rescaled, default=0.0)
    else:
        return None
    return max(*deltas, summed, mixed, abs(mix.lam) * mixed + base)
