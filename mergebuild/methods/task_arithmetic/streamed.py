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
block sums; the same ``mix_`` per element), whatever the chunk size (a multiple of
``REDUCE_BLOCK``) or worker count: the histograms are integer sums, the l1 sums are per fixed
block, and the one order-dependent state — how many threshold ties earlier chunks kept — is
handed from chunk to chunk. A magnitude cut with an l1 rescale and DELLA need whole tensors
(``Method.streamable``).

Chunks are spread over the workspace's threads; each worker has its own scratch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

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
from mergebuild.methods.task_arithmetic.whole import mix_


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


def _keep_between_into(d: torch.Tensor, src: torch.Tensor, bits: torch.Tensor, low: int,
                       high: int, mask: torch.Tensor) -> None:
    """``d`` = ``src`` zeroed (+0.0) outside keep ∖ drop, i.e. where ``bits < low`` or
    ``bits >= high``, written from the shared ``src`` without copying it first, with int32
    masks (bool tensors are slow to make): −1 where ``bits >= low`` is
    ``(low − 1 − bits) >> 31`` and −1 where ``bits < high`` is ``(bits − high) >> 31``; bits
    lie in [0, 2³¹) and the bounds used here in [1, 2³¹), so nothing overflows."""
    if low >= high:
        d.zero_()
        return
    first = True
    out = d.view(torch.int32)
    if low > 0:
        torch.sub(torch.tensor(low - 1, dtype=torch.int32), bits, out=mask)
        torch.bitwise_and(src.view(torch.int32), mask.bitwise_right_shift_(31), out=out)
        first = False
    if high < 1 << 31:
        torch.sub(bits, high, out=mask).bitwise_right_shift_(31)
        if first:
            torch.bitwise_and(src.view(torch.int32), mask, out=out)
            first = False
        else:
            out.bitwise_and_(mask)
    if first:
        d.copy_(src)


def _part_key(p: _Parent) -> Any:
    """What makes parent p's part the same in two variants (None: never shared): its keep
    and cuts; DARE's draws follow each variant's seed."""
    if p.keep.mode in ("random", "della"):
        return None
    cuts = tuple((c.k, c.threshold, c.ties_kept) for c in (p.top, p.outliers) if c is not None)
    return (p.keep, cuts)


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
    merge_many(parents, base, [params], [seed], [out], workspace, consumed, method=method)


def merge_many(
    parents: list[torch.Tensor],
    base: torch.Tensor,
    params: list[TensorParams],
    seeds: list[int | None],
    outs: list[torch.Tensor],
    workspace: ChunkWorkspace,
    consumed=None,
    *,
    method: Method,
) -> None:
    """``merge`` for several variants (parameters and seeds) over the same inputs, in one
    set of passes; ``outs[v]`` is bit for bit ``merge`` with ``params[v]``, ``seeds[v]``.

    What depends only on the inputs is done once: each chunk's task vectors, the high
    histograms of their magnitudes (pass 1), the low histograms of every bucket a variant's
    cut lands in (pass 2), the l1 block sums before DARE's mask, and the magnitude bit
    patterns of pass 3. Each variant then masks, weights and mixes its own copy.
    """
    if workspace.chunk % REDUCE_BLOCK:
        raise ValueError(f"chunk must be a multiple of {REDUCE_BLOCK}")
    n = outs[0].numel()
    variants = []
    for p, seed in zip(params, seeds, strict=True):
        keeps, mix = plan(method, p, n)
        plans = _parents(keeps, n)
        if any(q.keep.mode == "random" for q in plans) and seed is None:
            raise RuntimeError("random sparsification needs a seeded generator")
        variants.append((plans, mix, seed))
    chunk = workspace.chunk
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    ws = workspace
    last = len(variants) - 1

    def deltas(s: int, e: int, which: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        b = ws.buffer("base", torch.float32)[: e - s]
        b.copy_(base[s:e])
        ds = {}
        for i in which:
            d = ws.buffer(("delta", i), torch.float32)[: e - s]
            d.copy_(parents[i][s:e])
            ds[i] = d.sub_(b)
        return b, ds

    def own(name: Any, x: torch.Tensor, v: int) -> torch.Tensor:
        """Variant v's copy of a shared chunk (the last variant may work on the original)."""
        return x if v == last else ws.buffer(name, torch.float32)[: x.numel()].copy_(x)

    cut_parents = [[p for p in plans if p.cuts()] for plans, _, _ in variants]
    l1_parents = [[p for p in plans if p.keep.mode == "random" and p.keep.rescale == "l1"]
                  for plans, _, _ in variants]
    histogram_of = sorted({p.index for ps in cut_parents for p in ps})
    l1_of = sorted({p.index for ps in l1_parents for p in ps})
    # DARE's keep masks drawn in pass 1 (for the l1 sums), bit-packed for pass 3: n/8 bytes
    # per parent instead of drawing every uniform twice (~1.4 ns each; packing ~0.2 ns).
    drawn: dict[tuple[int, int, int], np.ndarray] = {}
    n_blocks = -(-n // REDUCE_BLOCK)
    before = {i: [0.0] * n_blocks for i in l1_of}  # l1 block sums before any mask
    for ps in l1_parents:
        for p in ps:
            p.after = [0.0] * n_blocks

    # Pass 1: high histograms, l1 block sums.
    highs = {i: torch.zeros(HIGH_BUCKETS, dtype=torch.int64) for i in histogram_of}
    adding = threading.Lock()
    if histogram_of or l1_of:
        def pass1(span):
            s, e = span
            keys = ws.buffer("keys", torch.int32)
            bits = ws.buffer("bits", torch.int32)
            _, ds = deltas(s, e, sorted({*histogram_of, *l1_of}))
            for i in histogram_of:
                h = high_histogram(abs_bits(ds[i], bits), keys)
                with adding:  # summed as they come: not one 256 KB histogram per chunk kept
                    highs[i] += h
            block0 = s // REDUCE_BLOCK
            for i in l1_of:
                sums = l1_blocks(ds[i])
                before[i][block0 : block0 + len(sums)] = sums
            for v, ps in enumerate(l1_parents):
                seed = variants[v][2]
                for p in ps:
                    d = own(("vdelta", p.index), ds[p.index], v)
                    mask = keep_draws(seed, p.index, s, e, p.keep.density)
                    drawn[(v, p.index, s)] = np.packbits(mask.numpy())
                    keep_only_(d, mask)
                    sums = l1_blocks(d)
                    p.after[block0 : block0 + len(sums)] = sums

        ws.run(pass1, spans)
        for ps in l1_parents:
            for p in ps:
                p.before = before[p.index]
                p.factor = l1_factor(sum(p.before), sum(p.after))
        for ps in cut_parents:
            for p in ps:
                for cut in p.cuts():
                    cut.bucket, above = select_from_top(highs[p.index], cut.k)
                    cut.need = cut.k - above

    # Pass 2: low histograms inside each bucket a cut lands in → exact thresholds; each
    # chunk's histogram is kept sparse so the ties before every chunk can be counted.
    all_cuts = [(p.index, c) for ps in cut_parents for p in ps for c in p.cuts()]
    buckets = sorted({(i, c.bucket) for i, c in all_cuts})  # (parent, bucket), each once
    if buckets:
        totals = [torch.zeros(LOW_BINS, dtype=torch.int64) for _ in buckets]

        def pass2(span):
            s, e = span
            keys = ws.buffer("keys", torch.int32)
            bits = ws.buffer("bits", torch.int32)
            sparse_lows = []
            _, ds = deltas(s, e, sorted({i for i, _ in buckets}))
            done = -1
            for k, (i, bucket) in enumerate(buckets):
                if i != done:
                    b = abs_bits(ds[i], bits)
                    done = i
                h = low_histogram(b, bucket, keys)
                with adding:
                    totals[k] += h
                # Kept sparse, made here on the worker: a dense histogram per chunk and
                # bucket (512 KB) held until the pass ends took ~600 MB for an 8-variant
                # sweep's embeddings, and making them sparse afterwards was serial work.
                inside = h[1:-1].nonzero().reshape(-1)
                sparse_lows.append(dict(zip(inside.tolist(), h[1:-1][inside].tolist())))
            return sparse_lows

        sparse: list[list[dict[int, int]]] = [[] for _ in buckets]
        for sparse_lows in ws.run(pass2, spans):
            for counts, per_chunk in zip(sparse_lows, sparse):
                per_chunk.append(counts)
        where = {key: k for k, key in enumerate(buckets)}
        for i, cut in all_cuts:
            k = where[(i, cut.bucket)]
            low, per_chunk = totals[k], sparse[k]
            found = cut_in_bucket(low, cut.bucket, cut.need)
            cut.threshold, cut.ties_kept = found.threshold_bits, found.ties_kept
            low_bits = found.threshold_bits & 0xFFFF
            if 0 < cut.ties_kept < int(low[1 + low_bits]):  # ties split: count per chunk
                cut.ties_before = [0]
                for counts in per_chunk:
                    cut.ties_before.append(cut.ties_before[-1] + counts.get(low_bits, 0))

    # Pass 3: the merges. A parent whose part (task vector, masked, rescaled, weighted) is
    # the same in several variants (same keep and cut; DARE's draws differ by seed, so never)
    # is made once per chunk and read by each, with its signs; the others are masked
    # straight from the shared task vector into the variant's buffer.
    n_parents = len(parents)
    ranked = sorted({p.index for plans, _, _ in variants for p in plans
                     if p.keep.mode == "ranks"})
    part_keys = [[_part_key(p) for p in plans] for plans, _, _ in variants]
    uses: dict[Any, int] = {}
    for row in part_keys:
        for key in row:
            if key is not None:
                uses[key] = uses.get(key, 0) + 1
    slots = {key: k for k, key in enumerate(sorted((k for k, c in uses.items() if c > 1),
                                                   key=repr))}

    def part_into(d: torch.Tensor, p: _Parent, v: int, index: int, src: torch.Tensor,
                  pbits: torch.Tensor | None, seed: int | None) -> torch.Tensor:
        """Parent p's part for variant v over chunk ``index``, made from the shared task
        vector ``src`` (left as it is) into ``d``."""
        s, e = spans[index]
        keep = p.keep
        if keep.mode == "zero":
            d.zero_()
        elif keep.mode == "ranks":
            low, high = p.top.bound(index), p.outliers.bound(index)
            if low is not None and high is not None:
                _keep_between_into(d, src, pbits, low, high,
                                   ws.buffer("keys", torch.int32)[: e - s])
            else:
                d.copy_(src)
                inside = (pbits >= low if low is not None
                          else p.top.member(pbits, index))
                if high is None:
                    inside &= ~p.outliers.member(pbits, index)
                elif high < 1 << 31:
                    inside &= pbits < high
                keep_only_(d, inside)
            if keep.rescale == "inverse_density":
                d.div_(keep.density)
        elif keep.mode == "random":
            d.copy_(src)
            packed = drawn.pop((v, p.index, s), None)
            keep_only_(d, keep_draws(seed, p.index, s, e, keep.density)
                       if packed is None
                       else torch.from_numpy(np.unpackbits(packed, count=e - s)
                                             .view(np.bool_)))
            if keep.rescale == "l1":
                if p.factor is not None:
                    d.mul_(p.factor)
            elif keep.rescale == "inverse_density":
                d.div_(keep.density)
        else:
            d.copy_(src)
        return d.mul_(keep.weight)

    def pass3(index: int) -> None:
        s, e = spans[index]
        shared_b, shared = deltas(s, e, list(range(n_parents)))
        bits = {i: abs_bits(shared[i], ws.buffer(("pbits", i), torch.int32)[: e - s])
                for i in ranked}
        made: dict[Any, torch.Tensor] = {}  # shared parts of this chunk, by key
        signs: dict[Any, torch.Tensor] = {}
        ones = zeros = None
        for v, (plans, mix, seed) in enumerate(variants):
            ds, sign_of = [], []
            for p, key in zip(plans, part_keys[v]):
                slot = slots.get(key)
                if slot is None:
                    ds.append(part_into(ws.buffer(("vdelta", p.index), torch.float32)[: e - s],
                                        p, v, index, shared[p.index], bits.get(p.index), seed))
                    sign_of.append(None)
                    continue
                if key not in made:
                    made[key] = part_into(ws.buffer(("spart", slot), torch.float32)[: e - s],
                                          p, v, index, shared[p.index], bits.get(p.index), seed)
                if mix.consensus == "sum" and key not in signs:
                    signs[key] = torch.sign(made[key],
                                            out=ws.buffer(("ssign", slot), torch.float32)[: e - s])
                ds.append(made[key])
                sign_of.append(signs.get(key))
            if mix.consensus == "sum" and ones is None:
                ones = ws.buffer("ones", torch.float32)[: e - s].fill_(1.0)
                zeros = ws.buffer("zeros", torch.float32)[: e - s].zero_()
            mixed = mix_(ds, [p.keep.weight for p in plans], mix.consensus, mix.normalize,
                         mix.lam, ws.buffer, signs=sign_of, ones=ones, zeros=zeros)
            outs[v][s:e].copy_(torch.add(shared_b, mixed, out=mixed))
        if consumed is not None:
            consumed(s, e)

    ws.run(pass3, range(len(spans)))
