"""The task-arithmetic family (TIES, DARE, breadcrumbs, DELLA): one engine, per-method knobs.

Per output tensor, with δ_i = x_i − b::

    sparsify each δ_i on its own → δ'_i = w_i·δ_i → optional sign consensus → Σ
    → optional normalise → × lambda → b + result

Sparsifiers: ``magnitude`` (TIES: keep the top ``int(density·n)`` by |δ|, at least one),
``random`` (DARE: Bernoulli keep with p = density), ``magnitude_outliers`` (breadcrumbs:
drop the top ``int(gamma·n)``, keep the next ``int(density·n)``), ``della`` (per row: keep
with p = density − ε + 2ε·rank/(m−1)). Ties in magnitude are broken by flat index, lowest
first (see ``topk``). All sparsifiers return δ unchanged when density ≥ 1, as mergekit does.

``rescale`` after sparsifying: ``l1`` (mergekit: × ‖δ‖₁/‖kept‖₁, skipped when either norm
< 1e-7), ``inverse_density`` (DARE paper / PEFT: ÷ density; for DELLA ÷ each element's own
keep probability, as in the DELLA paper), ``none``. Booleans keep mergekit's meaning:
true → ``l1``, false → ``none``.

Randomness comes only from the ``generator`` argument's seed. DARE's mask (since engine
version 2) is a pure function of (seed, parent index, element index): the flat tensor is cut
into blocks of ``RNG_BLOCK`` elements, block j of parent i draws from numpy's SFC64 seeded by
``SeedSequence([seed, i, j])``, each 64-bit word giving two 32-bit uniforms u (low half
first), and an element is kept iff ``u < ceil(density·2³²)`` (p = density to 2⁻³²). The l1
norms of the rescale are float64 sums over fixed blocks of ``REDUCE_BLOCK`` elements, added
in block order. So the result does not depend on how the engine chunks a tensor, on thread
count or on the order tensors are merged in, and a chunk's draws can be made on any thread.
DELLA still draws torch's CPU generator row block by row block (whole tensors only).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from mergebuild.methods.registry import METHODS, TensorParams
from mergebuild.methods.task_arithmetic.topk import CHUNK_ELEMENTS, keep_magnitude_ranks_, keep_only_

# method name → (sparsifier, takes a sign consensus)
_FAMILY: dict[str, tuple[str | None, bool]] = {
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
    "breadcrumbs": ("magnitude_outliers", False),
    "breadcrumbs_ties": ("magnitude_outliers", True),
    "della": ("della", True),
    "della_linear": ("della", False),
}

_RESCALE_NAMES = {
    True: "l1",
    False: "none",
    "l1": "l1",
    "inverse_density": "inverse_density",
    "none": "none",
}

# Rows of DELLA are ranked a block at a time to bound the sort's scratch memory.
_DELLA_BLOCK_ELEMENTS = 1 << 20
# Fixed grids that define DARE's draws and the l1 sums (part of the results; see docstring).
RNG_BLOCK = 1 << 18
REDUCE_BLOCK = 1 << 16


def rescale_mode(value: Any) -> str:
    """Map a ``rescale`` setting to "l1", "inverse_density" or "none" (bools as mergekit)."""
    try:
        return _RESCALE_NAMES[value]
    except (KeyError, TypeError):
        raise ValueError(
            f"rescale must be true, false, 'l1', 'inverse_density' or 'none', got {value!r}"
        ) from None


def _setting(method: str, values: Any, name: str) -> Any:
    if name in values and values[name] is not None:
        return values[name]
    param = METHODS[method].param(name)
    if param is None or param.required:
        raise ValueError(f"{method}: missing required parameter {name!r}")
    return param.default


def l1_blocks(flat: torch.Tensor) -> list[float]:
    """float64 sums of |x| over consecutive ``REDUCE_BLOCK``-element blocks of a flat tensor."""
    return [
        float(flat[s : s + REDUCE_BLOCK].abs().sum(dtype=torch.float64))
        for s in range(0, flat.numel(), REDUCE_BLOCK)
    ]


def _l1(x: torch.Tensor) -> float:
    return sum(l1_blocks(x.reshape(-1)))


def keep_draws(seed: int, parent: int, start: int, stop: int, density: float) -> torch.Tensor:
    """DARE's keep mask of elements [start, stop) of parent ``parent`` (see module docstring)."""
    out = np.empty(stop - start, dtype=np.bool_)
    threshold = np.uint32(math.ceil(density * 2**32))  # 0 < density < 1: fits in 32 bits
    pos = start
    while pos < stop:
        block = pos // RNG_BLOCK
        first = block * RNG_BLOCK
        end = min(stop, first + RNG_BLOCK)
        words = np.random.SFC64(np.random.SeedSequence([seed, parent, block])).random_raw(
            (end - first + 1) // 2
        )
        uniform = words.view("<u4")[pos - first : end - first]
        np.less(uniform, threshold, out=out[pos - start : end - start])
        pos = end
    return torch.from_numpy(out)


def _apply_l1_rescale_(delta: torch.Tensor, before: float) -> None:
    after = _l1(delta)
    if before >= 1e-7 and after >= 1e-7:
        delta.mul_(before / after)


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


def _sparsify_(
    delta: torch.Tensor,
    kind: str,
    density: float,
    rescale: str,
    gamma: float,
    epsilon: float,
    generator: torch.Generator | None,
    parent: int = 0,
) -> None:
    """Sparsify one task vector in place (``delta`` is contiguous)."""
    if density >= 1:
        return
    n = delta.numel()
    if density <= 0 or n == 0:
        delta.zero_()
        return
    if kind in ("random", "della") and generator is None:
        raise RuntimeError(f"{kind} sparsification needs a seeded generator")
    if kind == "della" and not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(
            f"della: density ± epsilon must lie in (0, 1); got density {density}, epsilon {epsilon}"
        )
    before = _l1(delta) if rescale == "l1" else 0.0
    if kind == "magnitude":
        keep_magnitude_ranks_(delta, 0, max(1, int(density * n)))
    elif kind == "magnitude_outliers":
        target = int(density * n)
        # As mergekit: the outlier cut shrinks when it would leave fewer than `target`.
        n_bottom = max(0, n - target - int(gamma * n))
        keep_magnitude_ranks_(delta, n - n_bottom - target, n - n_bottom)
    elif kind == "random":
        _random_keep_(delta, density, generator.initial_seed(), parent)
    elif kind == "della":
        _della_keep_(delta, density, epsilon, generator, rescale == "inverse_density")
    else:
        raise ValueError(f"unknown sparsification {kind!r}")
    if rescale == "l1":
        _apply_l1_rescale_(delta, before)
    elif rescale == "inverse_density" and kind != "della":
        delta.div_(density)


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


def _merge(
    method: str,
    parents: list[torch.Tensor],
    base: torch.Tensor | None,
    params: TensorParams,
    generator: torch.Generator | None,
) -> torch.Tensor:
    kind, takes_consensus = _FAMILY[method]
    if base is None:
        raise ValueError(f"{method} needs a base model")
    if not parents:
        return base
    base = base.contiguous()
    g = params.globals
    normalize = bool(_setting(method, g, "normalize"))
    lam = float(_setting(method, g, "lambda"))
    consensus = str(_setting(method, g, "consensus")) if takes_consensus else None
    rescale = rescale_mode(_setting(method, g, "rescale")) if kind else "none"

    names = {p.name for p in METHODS[method].params}
    weights: list[float] = []
    deltas: list[torch.Tensor] = []
    for i, (x, values) in enumerate(zip(parents, params.parents, strict=True)):
        if x.data_ptr() == base.data_ptr() or any(x.data_ptr() == d.data_ptr() for d in deltas):
            x = x.clone()  # the same model listed twice: never subtract in place from an alias
        delta = x.contiguous().sub_(base)
        if kind is not None:
            _sparsify_(
                delta,
                kind,
                density=float(_setting(method, values, "density")),
                rescale=rescale,
                gamma=float(_setting(method, values, "gamma")) if "gamma" in names else 0.0,
                epsilon=float(_setting(method, values, "epsilon")) if "epsilon" in names else 0.0,
                generator=generator,
                parent=i,
            )
        weight = float(_setting(method, values, "weight"))
        delta.mul_(weight)
        weights.append(weight)
        deltas.append(delta.view(-1))

    out = base.view(-1)
    for s in range(0, out.numel(), CHUNK_ELEMENTS):
        parts = [d[s : s + CHUNK_ELEMENTS] for d in deltas]
        mix_into_(out[s : s + CHUNK_ELEMENTS], parts, weights, consensus, normalize, lam)
    return base


def mix_into_(
    out: torch.Tensor,
    parts: list[torch.Tensor],
    weights: list[float],
    consensus: str | None,
    normalize: bool,
    lam: float,
    scratch=None,
) -> None:
    """``out += λ·mix(parts)`` elementwise: the weighted, sparsified task vectors of one span
    (modified in place) → optional sign consensus → sum → optional normalise.

    ``scratch(name, dtype)``, if given, returns a reused buffer of at least ``out.numel()``
    elements. The "sum" consensus runs on sign bits (no bool tensors, which are slow to make
    on CPU); it gives the same bits as the plain formulation (``_mix_reference_``), which
    handles spans whose sum is not finite (NaN and inf votes).
    """
    n = out.numel()

    def buffer(name: str, dtype: torch.dtype) -> torch.Tensor:
        if scratch is None:
            return torch.empty(n, dtype=dtype, device=out.device)
        return scratch(name, dtype)[:n]

    total_weight = sum(weights)
    plain_divisor = 1.0 if abs(total_weight) < 1e-8 else total_weight
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
        elected = buffer("elected", torch.float32).fill_(1.0)
        torch.copysign(elected, mixed, out=elected)
        kept = buffer("kept", torch.float32).zero_()
        divisor = buffer("divisor", torch.float32).zero_() if normalize else None
        agree = buffer("agree", torch.float32)
        for p, w in zip(parts, weights):
            torch.sign(p, out=agree).mul_(elected).clamp_min_(0.0)
            kept.addcmul_(p, agree)
            if divisor is not None:
                divisor.add_(agree, alpha=w)
        if divisor is not None:
            zero = buffer("zero", torch.bool)
            torch.eq(divisor, 0, out=zero)
            divisor.add_(agree.copy_(zero))  # 0 → 1, the rest unchanged
            kept.div_(divisor)
        mixed = kept
    if lam != 1:
        mixed.mul_(lam)
    out.add_(mixed)


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
        mixed.add_(keep_only_(p, agrees))
        divisor.add_(agrees, alpha=w)
    if normalize:
        mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return mixed


def merge_task_arithmetic(parents, base, params, generator=None) -> torch.Tensor:
    """Task arithmetic: b + λ·Σ w_i(x_i − b) (÷ Σ w_i when ``normalize``)."""
    return _merge("task_arithmetic", parents, base, params, generator)


def merge_ties(parents, base, params, generator=None) -> torch.Tensor:
    """TIES: magnitude top-k per task vector, sign consensus, normalised sum."""
    return _merge("ties", parents, base, params, generator)


def merge_dare_linear(parents, base, params, generator=None) -> torch.Tensor:
    """DARE: random drop with keep probability ``density``, rescale, weighted sum.

    The mask of parent i (position in the node's model list) keeps flat element j iff the
    j-th 32-bit uniform of its stream is below ``ceil(density·2³²)``; the stream is numpy's
    SFC64 seeded by ``SeedSequence([seed, i, j // RNG_BLOCK])`` per block of ``RNG_BLOCK``
    elements (two uniforms per 64-bit word, low half first), ``seed`` being the generator's
    (the engine's per-(node key, tensor name) seed). It does not depend on chunking, threads,
    device or tensor order (engine version 2; version 1 drew torch's generator in sequence).
    """
    return _merge("dare_linear", parents, base, params, generator)


def merge_dare_ties(parents, base, params, generator=None) -> torch.Tensor:
    """DARE-TIES: random drop, rescale, sign consensus (the mask as ``merge_dare_linear``)."""
    return _merge("dare_ties", parents, base, params, generator)


def merge_breadcrumbs(parents, base, params, generator=None) -> torch.Tensor:
    """Model breadcrumbs: drop the top ``gamma`` outliers and the small tail, weighted sum."""
    return _merge("breadcrumbs", parents, base, params, generator)


def merge_breadcrumbs_ties(parents, base, params, generator=None) -> torch.Tensor:
    """Breadcrumbs sparsification with TIES sign consensus."""
    return _merge("breadcrumbs_ties", parents, base, params, generator)


def merge_della(parents, base, params, generator=None) -> torch.Tensor:
    """DELLA: rank-dependent random drop per row, rescale, sign consensus."""
    return _merge("della", parents, base, params, generator)


def merge_della_linear(parents, base, params, generator=None) -> torch.Tensor:
    """DELLA without consensus: rank-dependent random drop per row, weighted sum."""
    return _merge("della_linear", parents, base, params, generator)
