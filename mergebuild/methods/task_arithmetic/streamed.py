"""The task-arithmetic family over chunks: memory O(chunk) however large the tensor.

The whole-tensor methods in ``task_arithmetic`` convert every parent to a float32 tensor.
Here the parents stay where they are (bf16 mmap views, say) and are read a chunk at a time
into reused float32 scratch, in up to three passes:

1. (only if a parent needs it) δ_i = x_i − b per chunk: the high-16-bit histogram of |δ_i|
   for each magnitude cut (``topk``'s radix select), the l1 block sums before and after the
   DARE mask for an ``l1`` rescale;
2. (only for magnitude cuts) the low-16-bit histogram inside each cut's bucket → the exact
   threshold and how many ties at it are kept;
3. per chunk: δ_i again, mask (DARE's, when pass 1 drew it for the l1 sums, kept from there
   bit-packed: n/8 bytes per parent), rescale, × w_i, sign consensus, sum, normalise, × λ,
   + b, cast into ``out``.

Both schedules apply one plan (``keep.plan``), so the results are bit for bit those of
``whole.merge`` (same total order for the top k, ties by flat index; same DARE draws and l1
block sums; the same ``mix_into_`` per element), whatever the chunk size (a multiple of
``REDUCE_BLOCK``) or worker count: the histograms are integer sums, the l1 sums are per fixed
block, and the one order-dependent state — how many threshold ties earlier chunks kept — is
handed from chunk to chunk. A magnitude cut with an l1 rescale and DELLA need whole tensors
(``Method.streamable``).

Chunks are spread over the workspace's threads; each worker has its own scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mergebuild.methods.chunks import ChunkWorkspace
from mergebuild.methods.registry import Method, TensorParams
from mergebuild.methods.task_arithmetic.keep import (
    REDUCE_BLOCK,
    Keep,
    keep_draws,
    l1_blocks,
    l1_factor,
    plan,
)
from mergebuild.methods.task_arithmetic.topk import (
    HIGH_BUCKETS,
    LOW_BINS,
    abs_bits,
    cut_in_bucket,
    high_histogram,
    keep_only_,
    low_histogram,
    select_from_top,
)
from mergebuild.methods.task_arithmetic.whole import mix_into_


@dataclass
class _Cut:
    """The top-k set of one parent's |δ| for one k, chunk by chunk.

    Members are the elements with bit pattern > ``threshold`` plus the first ``ties_kept``
    elements equal to it in index order; ``ties_before[c]`` (from pass 2's per-chunk
    histograms) is how many equal elements lie before chunk c, so every chunk knows its
    share of the ties without waiting for the chunks before it.
    """

    k: int
    n: int
    bucket: int = 0
    need: int = 0
    threshold: int = 0
    ties_kept: int = 0
    ties_before: list[int] = field(default_factory=list)

    @property
    def everything(self) -> bool:
        return self.k >= self.n

    @property
    def nothing(self) -> bool:
        return self.k <= 0

    @property
    def trivial(self) -> bool:
        return self.everything or self.nothing

    def bound(self, chunk: int) -> int | None:
        """Chunk ``chunk``'s members as ``bits >= bound`` (2³¹: none), or None when only
        some of its ties are members (the one chunk where the kept ties end)."""
        if self.everything:
            return 0
        if self.nothing:
            return 1 << 31
        if not self.ties_before:
            return self.threshold if self.ties_kept else self.threshold + 1
        before, after = self.ties_before[chunk], self.ties_before[chunk + 1]
        if after <= self.ties_kept:
            return self.threshold
        if before >= self.ties_kept:
            return self.threshold + 1
        return None

    def member(self, bits: torch.Tensor, chunk: int) -> torch.Tensor:
        """The bool membership of a chunk where the kept ties end."""
        inside = bits > self.threshold
        equal = (bits == self.threshold).nonzero().reshape(-1)
        inside[equal[: self.ties_kept - self.ties_before[chunk]]] = True
        return inside


def _keep_between_(d: torch.Tensor, bits: torch.Tensor, low: int, high: int,
                   mask: torch.Tensor) -> None:
    """Zero ``d`` outside keep ∖ drop with int32 masks (bool tensors are slow to make):
    −1 where ``bits >= low`` is ``~((bits − low) >> 31)``; bits lie in [0, 2³¹) and a bound
    used here in [1, 2³¹), so the difference cannot overflow."""
    if low >= high:
        d.zero_()
        return
    if low > 0:
        torch.sub(bits, low, out=mask).bitwise_right_shift_(31).bitwise_not_()
        d.view(torch.int32).bitwise_and_(mask)
    if high < 1 << 31:
        torch.sub(bits, high, out=mask).bitwise_right_shift_(31)
        d.view(torch.int32).bitwise_and_(mask)


@dataclass
class _Parent:
    """One parent's keep plan and what the passes learn about it."""

    keep: Keep
    top: _Cut | None = None  # "ranks": the ranks below stop ...
    outliers: _Cut | None = None  # ... minus those below start
    factor: float | None = None  # l1 rescale factor once known
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)

    @property
    def index(self) -> int:
        return self.keep.index

    def cuts(self) -> list[_Cut]:
        return [c for c in (self.top, self.outliers) if c is not None and not c.trivial]


def _parents(keeps: list[Keep], n: int) -> list[_Parent]:
    parents = []
    for keep in keeps:
        if keep.mode == "della" or keep.mode == "ranks" and keep.rescale == "l1":
            raise ValueError(f"{keep.mode} with rescale {keep.rescale} needs whole tensors")
        p = _Parent(keep)
        if keep.mode == "ranks":
            p.top, p.outliers = _Cut(keep.stop, n), _Cut(keep.start, n)
        parents.append(p)
    return parents


def merge(
    parents: list[torch.Tensor],
    base: torch.Tensor,
    params: TensorParams,
    seed: int | None,
    out: torch.Tensor,
    workspace: ChunkWorkspace,
    consumed=None,
    *,
    method: Method,
) -> None:
    """Merge flat CPU tensors ``parents`` over flat ``base`` into flat ``out``, chunk by chunk.

    Args:
        parents, base: flat tensors of any float dtype (e.g. bf16 mmap views); not modified.
        params: the tensor's parameters; seed: the tensor's seed (randomised methods).
        out: flat output tensor (its dtype is the cast at the end).
        workspace: threads and scratch; ``consumed(start, stop)`` is called once a span of
            the inputs is read for the last time.
        method: the family member, for which ``method.streamable(params)`` holds.
    """
    if workspace.chunk % REDUCE_BLOCK:
        raise ValueError(f"chunk must be a multiple of {REDUCE_BLOCK}")
    n = out.numel()
    keeps, mix = plan(method, params, n)
    plans = _parents(keeps, n)
    if any(p.keep.mode == "random" for p in plans) and seed is None:
        raise RuntimeError("random sparsification needs a seeded generator")
    chunk = workspace.chunk
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    ws = workspace

    def deltas(s: int, e: int, which: list[_Parent]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b = ws.buffer("base", torch.float32)[: e - s]
        b.copy_(base[s:e])
        ds = []
        for p in which:
            d = ws.buffer(("delta", p.index), torch.float32)[: e - s]
            d.copy_(parents[p.index][s:e])
            ds.append(d.sub_(b))
        return b, ds

    cut_parents = [p for p in plans if p.cuts()]
    l1_parents = [p for p in plans if p.keep.mode == "random" and p.keep.rescale == "l1"]
    # DARE's keep masks drawn in pass 1 (for the l1 sums), bit-packed for pass 3: n/8 bytes
    # per parent instead of drawing every uniform twice (~1.4 ns each; packing ~0.2 ns).
    drawn: dict[tuple[int, int], np.ndarray] = {}
    n_blocks = -(-n // REDUCE_BLOCK)
    for p in l1_parents:
        p.before, p.after = [0.0] * n_blocks, [0.0] * n_blocks

    # Pass 1: high histograms, l1 block sums.
    if cut_parents or l1_parents:
        def pass1(span):
            s, e = span
            keys = ws.buffer("keys", torch.int32)
            bits = ws.buffer("bits", torch.int32)
            hists = {}
            _, ds = deltas(s, e, cut_parents + l1_parents)
            for p, d in zip(cut_parents + l1_parents, ds):
                if p.keep.mode == "ranks":
                    hists[p.index] = high_histogram(abs_bits(d, bits), keys)
                else:
                    block0 = s // REDUCE_BLOCK
                    sums = l1_blocks(d)
                    p.before[block0 : block0 + len(sums)] = sums
                    mask = keep_draws(seed, p.index, s, e, p.keep.density)
                    drawn[(p.index, s)] = np.packbits(mask.numpy())
                    keep_only_(d, mask)
                    sums = l1_blocks(d)
                    p.after[block0 : block0 + len(sums)] = sums
            return hists

        highs = {p.index: torch.zeros(HIGH_BUCKETS, dtype=torch.int64) for p in cut_parents}
        for hists in ws.run(pass1, spans):
            for i, h in hists.items():
                highs[i] += h
        for p in l1_parents:
            p.factor = l1_factor(sum(p.before), sum(p.after))
        for p in cut_parents:
            for cut in p.cuts():
                cut.bucket, above = select_from_top(highs[p.index], cut.k)
                cut.need = cut.k - above

    # Pass 2: low histograms inside each cut's bucket → exact thresholds; each chunk's
    # histogram is kept sparse so the ties before every chunk can be counted afterwards.
    all_cuts = [c for p in cut_parents for c in p.cuts()]
    if all_cuts:
        def pass2(span):
            s, e = span
            keys = ws.buffer("keys", torch.int32)
            bits = ws.buffer("bits", torch.int32)
            lows = []
            _, ds = deltas(s, e, cut_parents)
            for p, d in zip(cut_parents, ds):
                b = abs_bits(d, bits)
                for cut in p.cuts():
                    lows.append(low_histogram(b, cut.bucket, keys))
            return lows

        totals = [torch.zeros(LOW_BINS, dtype=torch.int64) for _ in all_cuts]
        sparse: list[list[dict[int, int]]] = [[] for _ in all_cuts]
        for lows in ws.run(pass2, spans):
            for t, h, per_chunk in zip(totals, lows, sparse):
                t += h
                inside = h[1:-1].nonzero().reshape(-1)
                per_chunk.append(dict(zip(inside.tolist(), h[1:-1][inside].tolist())))
        for cut, low, per_chunk in zip(all_cuts, totals, sparse):
            found = cut_in_bucket(low, cut.bucket, cut.need)
            cut.threshold, cut.ties_kept = found.threshold_bits, found.ties_kept
            low_bits = found.threshold_bits & 0xFFFF
            if 0 < cut.ties_kept < int(low[1 + low_bits]):  # ties split: count per chunk
                cut.ties_before = [0]
                for counts in per_chunk:
                    cut.ties_before.append(cut.ties_before[-1] + counts.get(low_bits, 0))

    # Pass 3: the merge.
    weights = [p.keep.weight for p in plans]

    def pass3(index: int) -> None:
        s, e = spans[index]
        b, ds = deltas(s, e, plans)
        bits = ws.buffer("bits", torch.int32)[: e - s]
        for p, d in zip(plans, ds):
            keep = p.keep
            if keep.mode == "zero":
                d.zero_()
            elif keep.mode == "ranks":
                abs_bits(d, bits)
                low, high = p.top.bound(index), p.outliers.bound(index)
                if low is not None and high is not None:
                    _keep_between_(d, bits, low, high, ws.buffer("keys", torch.int32)[: e - s])
                else:
                    inside = (bits >= low if low is not None
                              else p.top.member(bits, index))
                    if high is None:
                        inside &= ~p.outliers.member(bits, index)
                    elif high < 1 << 31:
                        inside &= bits < high
                    keep_only_(d, inside)
                if keep.rescale == "inverse_density":
                    d.div_(keep.density)
            elif keep.mode == "random":
                packed = drawn.pop((p.index, s), None)
                keep_only_(d, keep_draws(seed, p.index, s, e, keep.density) if packed is None
                           else torch.from_numpy(np.unpackbits(packed, count=e - s)
                                                 .view(np.bool_)))
                if keep.rescale == "l1":
                    if p.factor is not None:
                        d.mul_(p.factor)
                elif keep.rescale == "inverse_density":
                    d.div_(keep.density)
            d.mul_(keep.weight)
        mix_into_(b, ds, weights, mix.consensus, mix.normalize, mix.lam, ws.buffer)
        out[s:e].copy_(b)
        if consumed is not None:
            consumed(s, e)

    ws.run(pass3, range(len(spans)))
