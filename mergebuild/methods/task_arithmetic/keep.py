"""The task-arithmetic family's knobs and keep plan, shared by the whole-tensor and streamed kernels.

A member's ``settings`` and a tensor's parameters decide, before any arithmetic, what each
parent's task vector goes through (``Keep``: everything, nothing, a range of magnitude ranks,
DARE's random mask or DELLA's ranked one, then the rescale) and how the vectors are mixed
(``Mix``). Both schedules apply this one plan, so a sparsifier is defined once.

DARE's mask is a pure function of (seed, parent index, element index): the flat tensor is
cut into blocks of ``RNG_BLOCK`` elements, block j of parent i draws from numpy's SFC64 seeded
by ``SeedSequence([seed, i, j])``, each 64-bit word giving two 32-bit uniforms u (low half
first), and an element is kept iff ``u < ceil(density·2³²)`` (p = density to 2⁻³²). The l1
norms of the rescale are float64 sums over fixed blocks of ``REDUCE_BLOCK`` elements, added
in block order. So results do not depend on how a tensor is chunked, on thread count or on
the order tensors are merged in, and a chunk's draws can be made on any thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mergebuild.methods.registry import Method, RescaleMode, TensorParams, rescale_mode

# Fixed grids that define DARE's draws and the l1 sums (part of the results; see docstring).
RNG_BLOCK = 1 << 18
REDUCE_BLOCK = 1 << 16


@dataclass(frozen=True)
class Keep:
    """What one parent's task vector goes through before it is weighted.

    ``mode``: ``all`` (unchanged, no rescale), ``zero``, ``ranks`` (magnitude ranks
    [start, stop) kept, rank 0 the largest, ties by flat index), ``random`` (DARE's mask),
    ``della`` (per row, keep p = density − ε + 2ε·rank/(m−1)); then ``rescale``.
    """

    index: int
    weight: float
    mode: Literal["all", "zero", "ranks", "random", "della"]
    density: float = 1.0
    rescale: RescaleMode = "none"
    start: int = 0
    stop: int = 0
    epsilon: float = 0.0


@dataclass(frozen=True)
class Mix:
    """How the weighted task vectors are combined: optional sign election (the vote rule,
    "sum" or "count"), sum, optional normalise, × ``lam``."""

    consensus: str | None
    normalize: bool
    lam: float


def plan(method: Method, params: TensorParams, n: int) -> tuple[list[Keep], Mix]:
    """The keep plan of every parent of an ``n``-element tensor, and the mix."""
    settings = method.settings
    assert settings is not None, f"{method.name} is not a task-arithmetic family member"
    g = params.globals
    mix = Mix(
        consensus=str(method.value(g, "consensus")) if settings.consensus else None,
        normalize=bool(method.value(g, "normalize")),
        lam=float(method.value(g, "lambda")),
    )
    sparsifier = settings.sparsifier
    rescale = rescale_mode(method.value(g, "rescale")) if sparsifier else "none"
    keeps = []
    for i, values in enumerate(params.parents):
        weight = float(method.value(values, "weight"))
        density = float(method.value(values, "density")) if sparsifier else 1.0
        if sparsifier is None or density >= 1:  # as mergekit: nothing dropped, no rescale
            keeps.append(Keep(i, weight, "all"))
        elif density <= 0 or n == 0:
            keeps.append(Keep(i, weight, "zero"))
        elif sparsifier == "random":
            keeps.append(Keep(i, weight, "random", density, rescale))
        elif sparsifier == "della":
            epsilon = float(method.value(values, "epsilon"))
            if not (0 < density - epsilon and density + epsilon < 1):
                raise ValueError(f"della: density ± epsilon must lie in (0, 1); got density "
                                 f"{density}, epsilon {epsilon}")
            keeps.append(Keep(i, weight, "della", density, rescale, epsilon=epsilon))
        else:
            start, stop = _magnitude_ranks(sparsifier, values, method, density, n)
            start, stop = max(0, start), min(n, stop)
            if stop <= start:
                keeps.append(Keep(i, weight, "zero"))
            else:
                keeps.append(Keep(i, weight, "ranks", density, rescale, start, stop))
    return keeps, mix


def _magnitude_ranks(sparsifier: str, values, method: Method, density: float,
                     n: int) -> tuple[int, int]:
    if sparsifier == "magnitude":  # TIES: the top int(density·n), at least one
        return 0, max(1, int(density * n))
    # Breadcrumbs: drop the top int(gamma·n), keep the next int(density·n); as mergekit, the
    # outlier cut shrinks when it would leave fewer than that.
    gamma = float(method.value(values, "gamma"))
    target = int(density * n)
    n_bottom = max(0, n - target - int(gamma * n))
    return n - n_bottom - target, n - n_bottom


def l1_blocks(flat: torch.Tensor) -> list[float]:
    """float64 sums of |x| over consecutive ``REDUCE_BLOCK``-element blocks of a flat tensor."""
    return [
        float(flat[s : s + REDUCE_BLOCK].abs().sum(dtype=torch.float64))
        for s in range(0, flat.numel(), REDUCE_BLOCK)
    ]


def l1_factor(before: float, after: float) -> float | None:
    """The l1 rescale's factor (mergekit: skipped when either norm is below 1e-7)."""
    return before / after if before >= 1e-7 and after >= 1e-7 else None


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
