"""The streaming merge engine: parents' headers → checked tensor table → one tensor at a time."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import xxhash

from mergebuild import faults
from mergebuild.build.compat import (
    HEAD_NAMES,
    check_compatibility,
    head_name,
    involved_parents,
    layer_count,
    output_layout,
    reader_metadata,
    tensor_sources,
)
from mergebuild.build.output_config import StackedRange, output_config
from mergebuild.build.parameters import layer_index, replace_layer_index, resolve_value
from mergebuild.build.vocab import (
    VocabPlan,
    harmonize_metadata,
    is_vocab_tensor,
    plan_vocab,
    remap_rows,
    write_vocab_files,
)
from mergebuild.errors import (
    CheckpointError,
    CorruptParentError,
    IncompatibleModelsError,
    SourceError,
)
from mergebuild.io.chat_templates import expand_template
from mergebuild.io.checkpoint import CheckpointReader, TensorInfo
from mergebuild.io.dtypes import ARITHMETIC_CODES, FLOAT_CODES, dtype_code, dtype_size, torch_dtype
from mergebuild.io.hashing import file_xxh128, manifest_digest, stat_signature
from mergebuild.io.hf_layout import CONFIG_FILES, TOKENIZER_FILES, snapshot_repo_dir
from mergebuild.io.json_limits import (
    CONFIG_MAX_BYTES,
    TOKENIZER_MAX_BYTES,
    read_bytes_bounded,
    read_json_bounded,
)
from mergebuild.methods.registry import Method, TensorParams
from mergebuild.spec.validate import arithmetic_base

_PRE_LAYER_HINTS = ("embed", "wte", "wpe", "word_embeddings")


@dataclass(frozen=True)
class Participant:
    node: str
    parameters: Mapping[str, Any]  # after mergekit's precedence (entry, node, default)


@dataclass(frozen=True)
class SliceInput:
    """One output slice: its sources, its base (one of them, or None) and its node-wide
    parameters (the slice's over the node's; None: the job's)."""

    sources: tuple[tuple[str, tuple[int, int], Mapping[str, Any]], ...]  # (node, range, params)
    base: str | None = None
    global_parameters: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class BuildJob:
    """Everything the engine needs to build one merge node, as plain data."""

    node: str
    key: str
    method: Method
    parents: Mapping[str, Path]  # parent node → its model directory
    participants: tuple[Participant, ...]
    base: str | None
    donor: str
    global_parameters: Mapping[str, Any]
    out_dtype: str | None
    slices: tuple[SliceInput, ...] | None = None
    chat_template: str | None = None
    max_shard_bytes: int = 5 * 2**30
    device: str = "auto"
    adapters: Mapping[str, Path] = field(default_factory=dict)  # parent → LoRA directory
    tokenizer_source: str | None = None  # "base" | "union" | a parent: vocab rows by token
    pad_vocab_to: int | None = None  # tokenizer.pad_to_multiple_of
    tokens: tuple[Any, ...] = ()  # tokenizer.tokens: TokenEmbeddingSpec entries
    # parent → {file: "xxh128:<hex>"} as the store published it: every such parent is
    # hashed while it is read and must match (store objects; sources are stat-checked)
    published: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    allow_nonfinite: bool = False  # merge NaN/Inf parents (and results) instead of failing


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made: the base and participant tensors it reads."""

    name: str
    dtype: str  # safetensors dtype code of the output
    shape: tuple[int, ...]
    base: TensorInfo | None
    inputs: tuple[TensorInfo, ...]
    parameters: tuple[Mapping[str, Any], ...]
    layer: int | None
    num_layers: int
    remap: Callable[[list, Any], tuple[list, Any]] | None = None  # vocabulary rows by token
    globals: Mapping[str, Any] | None = None  # node-wide parameters (a slice's); None: the job's


@dataclass
class BuildOutput:
    files: dict[str, tuple[str, int]]  # filename → (sha256 hex, size)
    digest: str
    device: str
    tensors: int = 0
    bytes_written: int = 0
    peak_scratch_bytes: int = 0  # reused float32 buffers and chunk workspaces
    xxh128: dict[str, str] = field(default_factory=dict)  # weight files hashed as written


ProgressFn = Callable[[int, int, int, int], None]  # tensors done, total, bytes done, total


def select_device(requested: str) -> str:
    import torch

    if requested in ("auto", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SourceError("--device cuda was asked for but no CUDA device is available",
                          hint="use --device cpu or auto")
    return requested


# --- planning the tensor table (no torch) -------------------------------------------------


def _num_layers(reader: CheckpointReader) -> int:
    return layer_count(reader_metadata(reader))


def _out_dtype(job: BuildJob, info: TensorInfo) -> str:
    if job.out_dtype and info.dtype in FLOAT_CODES:
        return dtype_code(job.out_dtype)
    return info.dtype


def plan_tensors(job: BuildJob, readers: Mapping[str, CheckpointReader]) -> list[TensorTask]:
    """The output tensor table, after checking that every parent fits (before any arithmetic)."""
    check_compatibility(job, harmonize_metadata(
        job, {node: reader_metadata(r) for node, r in readers.items()}))
    if job.slices is not None:
        return _plan_slices(job, readers)
    donor = readers[job.donor]
    num_layers = _num_layers(donor)
    vocab = vocab_plan(job, readers)
    # The donor's layout (plus the head when tied and untied parents meet); a tied parent's
    # embedding stands in for the output's lm_head.
    layout = output_layout(reader_metadata(donor),
                           [reader_metadata(readers[n]) for n in involved_parents(job)])
    sources = {node: tensor_sources(layout, reader_metadata(r)) for node, r in readers.items()}

    def source(node: str, name: str) -> TensorInfo:
        return readers[node].tensors[sources[node][name] or name]

    base_node = arithmetic_base(job.base, job.method)
    tasks: list[TensorTask] = []
    for name in layout.tensors:
        info = source(job.donor, name)
        base = source(base_node, name) if base_node else None
        inputs = tuple(source(p.node, name) for p in job.participants)
        shape, remap = info.shape, None
        if vocab is not None and is_vocab_tensor(name):
            shape, remap = (vocab.rows, *info.shape[1:]), _vocab_remap(job, vocab)
        tasks.append(TensorTask(
            name=name, dtype=_out_dtype(job, info), shape=shape, base=base, inputs=inputs,
            parameters=tuple(p.parameters for p in job.participants), layer=layer_index(name),
            num_layers=num_layers, remap=remap,
        ))
    return tasks


def vocab_plan(job: BuildJob, readers: Mapping[str, CheckpointReader]) -> VocabPlan | None:
    """The row mapping of the node's tokenizer policy; None without one or when a no-op.

    With slices, as in mergekit, the embedding rows of the first slice's model and the
    lm_head rows of the last slice's model are mapped onto the output vocabulary.
    """
    if not job.tokenizer_source:
        return None
    base = arithmetic_base(job.base, job.method)
    nodes = involved_parents(job)
    if job.slices is not None:
        # Only the ends' rows are mapped (the embedding is merged over the first slice's
        # sources, the head over the last's); a union (like mergekit's) spans every model.
        ends = [node for s in (job.slices[0], job.slices[-1]) for node, _, _ in s.sources]
        every = [node for s in job.slices for node, _, _ in s.sources]
        base = None
        nodes = list(dict.fromkeys(every if job.tokenizer_source == "union" else ends))
    rows = {}
    for node, reader in readers.items():
        vocab_rows = [i.shape[0] for n, i in sorted(reader.tensors.items())
                      if is_vocab_tensor(n) and i.shape]
        if vocab_rows:
            rows[node] = vocab_rows[0]
    policy = job.tokenizer_source if job.tokenizer_source in ("base", "union") else "model"
    plan = plan_vocab(policy, job.donor, base, nodes, job.parents, rows, job.pad_vocab_to,
                      job.tokens)
    return None if plan.identity else plan


def _vocab_remap(job: BuildJob, plan: VocabPlan, inputs: list[str] | None = None,
                 base: str | None = None):
    """Rows by token for the merge's parents, or for a slice end's ``inputs`` and ``base``."""
    if inputs is None:
        base = arithmetic_base(job.base, job.method)
        inputs = [p.node for p in job.participants]
    nodes = [*([base] if base else []), *inputs]

    def remap(parents: list, base_tensor: Any) -> tuple[list, Any]:
        tensors = ([base_tensor] if base else []) + list(parents)
        out = remap_rows(tensors, nodes, plan, base)
        return (out[1:], out[0]) if base else (out, base_tensor)

    return remap


def _plan_slices(job: BuildJob, readers: Mapping[str, CheckpointReader]) -> list[TensorTask]:
    """The tensors of a sliced merge, planned as mergekit plans them (plan.py): each output
    layer is the method over its slice's sources (the slice's base apart, the slice's
    parameters over the node's); the embeddings are merged over the first slice's sources,
    the final norm and head over the last slice's (mergekit pairs those with as many sources
    as the first slice has), both at gradient position 0."""
    assert job.slices is not None
    first, last = job.slices[0], job.slices[-1]
    first_node = first.sources[0][0]
    vocab = vocab_plan(job, readers)
    tasks: list[TensorTask] = []
    donor_meta = reader_metadata(readers[job.donor])

    def non_layer(names: Iterable[str], pre: bool) -> list[str]:
        # An output head ("embed_out" included) comes after the layers, whatever its name.
        return [n for n in names if layer_index(n) is None
                and (n not in HEAD_NAMES and any(h in n for h in _PRE_LAYER_HINTS)) == pre]

    def merged(s: SliceInput, sources, out_name: str, names: list[str | None],
               layer: int | None, num_layers: int, what: str) -> TensorTask:
        """The method over ``sources`` (their tensors ``names``) for one output tensor."""
        base_info, infos, params, nodes = None, [], [], []
        for (node, _, p), src_name in zip(sources, names, strict=True):
            info = readers[node].tensors.get(src_name) if src_name else None
            if info is None:
                raise IncompatibleModelsError(
                    f"'{node}' lacks tensor {src_name or out_name} needed by {what}",
                    node=job.node, hint="slice sources must share the layer structure",
                )
            if s.base is not None and node == s.base and base_info is None:
                base_info = info
            else:
                infos.append(info)
                params.append(p)
                nodes.append(node)
        ref = infos[0] if infos else base_info
        assert ref is not None
        for info in (*infos, *((base_info,) if base_info else ())):
            if info.shape != ref.shape and not (vocab is not None and is_vocab_tensor(out_name)
                                                and info.shape[1:] == ref.shape[1:]):
                raise IncompatibleModelsError(
                    f"shape mismatch at {out_name}: {list(ref.shape)} vs {list(info.shape)}",
                    node=job.node,
                )
        shape, remap = ref.shape, None
        if vocab is not None and is_vocab_tensor(out_name):
            shape = (vocab.rows, *ref.shape[1:])
            remap = _vocab_remap(job, vocab, nodes, s.base if base_info else None)
        return TensorTask(
            name=out_name, dtype=_out_dtype(job, ref), shape=shape, base=base_info,
            inputs=tuple(infos), parameters=tuple(params), layer=layer, num_layers=num_layers,
            remap=remap, globals=s.global_parameters,
        )

    for name in non_layer(readers[first_node].tensors, pre=True):
        tasks.append(merged(first, first.sources, name, [name] * len(first.sources), None, 1,
                            "the first slice"))
    out_layer = 0
    for s in job.slices:
        node0, (start0, end0), _ = s.sources[0]
        width = end0 - start0
        template = [n for n in readers[node0].tensors if layer_index(n) == start0]
        for offset in range(width):
            for name in template:
                # Each source reads its own layer (a model listed twice reads both ranges).
                names = [replace_layer_index(name, start + offset)
                         for _, (start, _), _ in s.sources]
                tasks.append(merged(s, s.sources, replace_layer_index(name, out_layer), names,
                                    offset, width, "a slice"))
            out_layer += 1
    # Final norm and head in the output's layout: the donor's (its config says whether lm_head
    # is tied; a tied source supplies its embedding for the head), untied when the donor is
    # tied and a last-slice source has a head of its own (then the heads are merged too).
    last_sources = last.sources[: len(first.sources)]
    metas = {node: reader_metadata(readers[node]) for node, _, _ in last_sources}
    layout = output_layout(donor_meta, metas.values())
    layouts = {node: tensor_sources(layout, meta) for node, meta in metas.items()}
    for name in non_layer(layout.tensors, pre=False):
        tasks.append(merged(last, last_sources, name,
                            [layouts[node].get(name) for node, _, _ in last_sources], None, 1,
                            "the last slice"))
    return tasks


# --- running -----------------------------------------------------------------------------


def tensor_seed(key: str, tensor_name: str) -> int:
    """The seed of a randomised method for one tensor: independent of order and device."""
    return xxhash.xxh3_64_intdigest(f"{key}\0{tensor_name}".encode()) & (2**63 - 1)


def _resolve(values: Mapping[str, Any], task: TensorTask) -> dict[str, Any]:
    return {k: resolve_value(v, task.name, task.layer, task.num_layers) for k, v in values.items()}


def run_build(job: BuildJob, out_dir: Path, progress: ProgressFn | None = None) -> BuildOutput:
    """Build ``job`` into ``out_dir`` (a fresh temp dir); the caller publishes it."""
    return run_builds([job], [out_dir], progress)[0]


def fusable(jobs: Sequence[BuildJob]) -> bool:
    """Whether ``jobs`` can be built in one pass: the same parents (and adapters, and what the
    store published for them) on the same device. Their tensor tables must also agree,
    which ``run_builds`` checks."""
    first = jobs[0]
    return all(dict(j.parents) == dict(first.parents) and dict(j.adapters) == dict(first.adapters)
               and _published(j) == _published(first) and j.device == first.device
               for j in jobs)


def _published(job: BuildJob) -> dict[str, dict[str, str]]:
    return {node: dict(files) for node, files in job.published.items()}


def run_builds(jobs: Sequence[BuildJob], out_dirs: Sequence[Path],
               progress: ProgressFn | None = None) -> list[BuildOutput]:
    """Build every job of ``jobs`` (variants over the same parents) in one pass.

    Each parent tensor is mapped and paged in once and every job's output tensor is made
    from it before the pass moves on, instead of one full pass over the parents per job.
    Every job's tensor goes through exactly the code a build of that job alone runs (same
    kernels, same chunking, same seeds), so each output is byte for byte its separate
    build's; scratch buffers and worker threads are shared, and the writers' queued bytes
    are bounded together, so memory stays near one build's. ``out_dirs`` are fresh temp
    dirs, one per job; the caller publishes them. Jobs whose tensor tables differ are
    built one after another over the same open parents.

    The store-object parents (``published``, the same for every job) are hashed once, on
    a thread, while the pass reads them; the outputs are returned only once every hash
    matches (CorruptParentError otherwise), so no output of a corrupt parent is published.
    """
    import torch

    if len(jobs) != len(out_dirs) or not jobs:
        raise ValueError("run_builds needs one output directory per job, and a job")
    if not fusable(jobs):
        raise ValueError("jobs built in one pass must share their parents, adapters, "
                         "published parents and device")
    lead = jobs[0]
    nodes = ", ".join(job.node for job in jobs)
    device = select_device(lead.device)
    readers: dict[str, CheckpointReader] = {}
    hasher: _ParentHasher | None = None
    faults.point("engine.start")
    try:
        for node, directory in lead.parents.items():
            try:
                if node in lead.adapters:
                    from mergebuild.io.lora import AdaptedReader

                    readers[node] = AdaptedReader(directory, lead.adapters[node], lead.node)
                else:
                    readers[node] = CheckpointReader(directory)
            except CheckpointError as exc:
                exc.node = exc.node or node  # name the parent whose weights are unusable
                raise
            faults.point("engine.open_parent")
        # Store objects are checked by content (hashed as they stream, below); a parent
        # republished meanwhile with the same bytes is no change. Sources by stat signature.
        before = {node: _stat_weights(r) for node, r in readers.items()
                  if node not in lead.published}
        hasher = _ParentHasher(lead.published, lead.parents, readers, nodes)
        tables = [plan_tensors(job, readers) for job in jobs]
        names = [t.name for t in tables[0]]
        if len(jobs) > 1 and any([t.name for t in table] != names for table in tables[1:]):
            passes = [[j] for j in range(len(jobs))]
        else:
            passes = [list(range(len(jobs)))]
        _set_threads(torch)
        written: list[tuple[dict[str, str], dict[str, str], int]] = [({}, {}, 0)] * len(jobs)
        for members in passes:
            results = _run_pass([jobs[j] for j in members], [tables[j] for j in members],
                                [out_dirs[j] for j in members], readers, device, torch,
                                progress)
            for j, result in zip(members, results, strict=True):
                written[j] = result
        hasher.finish()
        for node, r in readers.items():
            if node in before and _stat_weights(r) != before[node]:
                raise SourceError(
                    f"the weights of '{node}' changed on disk while being merged", node=nodes,
                    hint="run make again once nothing is writing the parent",
                )
        outputs = []
        for job, table, out_dir, (hashes, xxh128, peak) in zip(jobs, tables, out_dirs, written,
                                                               strict=True):
            files = {name: (sha, (out_dir / name).stat().st_size)
                     for name, sha in hashes.items()}
            # The output stores a head its tied donor lacks: its config must say so.
            untie_head = (head_name(reader_metadata(readers[job.donor])) is None
                          and any(t.name in HEAD_NAMES for t in table))
            files.update(_copy_support_files(job, readers, out_dir, untie_head))
            vocab = vocab_plan(job, readers)
            if vocab is not None:
                write_vocab_files(vocab, out_dir, files)
            digest = manifest_digest({name: sha for name, (sha, _) in files.items()}, "sha256")
            outputs.append(BuildOutput(
                files=files, digest=digest, device=device, tensors=len(table),
                bytes_written=sum(_nbytes(t) for t in table), peak_scratch_bytes=peak,
                xxh128=xxh128))
    finally:
        if hasher is not None:
            hasher.stop()
        for r in readers.values():
            r.close()
    return outputs


def _run_pass(jobs, tables, out_dirs, readers, device: str, torch,
              progress: ProgressFn | None) -> list[tuple[dict[str, str], dict[str, str], int]]:
    """One pass over the parents for ``jobs`` (whose tensor tables agree); per job, its
    weight files' sha256 and xxh128 (hashed as written) and the pass's peak scratch bytes."""
    from mergebuild.io.checkpoint import CheckpointWriter

    largest = max((_nbytes(t) for table in tables for t in table), default=0)
    # Free output buffers kept: what the writers may hold at once (one tensor being written
    # while the next is computed, or the fused pass's budget), so the pass allocates them
    # once.
    shared = _SharedScratch(torch, device,
                            2 * (_queued_budget(tables) if len(jobs) > 1 else largest))
    streams = [_Streaming(job, table, readers, device, torch, shared)
               for job, table in zip(jobs, tables, strict=True)]
    funcs = [job.method.load() for job in jobs]
    writers: list[Any] = []
    # A fused pass's writers (one thread each) hash and write at most one tensor per core at
    # once: more only evict each other's and the merge threads' data from the caches (8
    # linear variants: ~8 % less wall time and CPU with two at a time on 2 cores than eight).
    lane = threading.Semaphore(_cores()) if len(jobs) > 1 else None
    # A fused pass writes its outputs with direct I/O (``CheckpointWriter(direct=True)``):
    # N outputs are N models' worth of fresh page cache, which on a VM whose host took the
    # free memory back costs most of the pass's system time (8 linear variants through
    # `make -B`: 4.6–5.0 → 1.3–1.7 s of system time, 12.0–13.4 → 10.8–12.7 s of wall), and
    # only one of them is usually read again soon (the selected variant). A single build
    # stays buffered: its child merge or evaluation reads it next, from the page cache.
    direct = len(jobs) > 1
    try:
        for job, table, out_dir in zip(jobs, tables, out_dirs, strict=True):
            writers.append(CheckpointWriter(
                out_dir, [(t.name, t.dtype, t.shape) for t in table],
                max_shard_bytes=job.max_shard_bytes, metadata={"format": "pt"},
                on_written=shared.outputs.release, lane=lane, direct=direct))
        hashes = _stream_tensors(jobs, tables, readers, funcs, device, torch, streams,
                                 writers, progress)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        shared.close()
    faults.point("engine.after_finish")
    peak = shared.peak_bytes()
    return [(sha, dict(writer.xxh128), peak)
            for sha, writer in zip(hashes, writers, strict=True)]


def _stream_tensors(jobs, tables, readers, funcs, device: str, torch, streams, writers,
                    progress: ProgressFn | None) -> list[dict[str, str]]:
    """The pass: tensor by tensor, every job's output from the same mapped parent pages.

    When the method allows it, a tensor's outputs are computed together from one read of
    its inputs (``_compute_together``), in groups of jobs whose outputs fit the budget
    below; otherwise job by job. Only the last reader of a tensor drops its parents' pages
    (earlier ones would make the next fault them in again). The bytes queued in all
    writers together, plus the outputs being computed, are kept under ``_queued_budget``
    by waiting for the writers that hold the oldest tensors.
    """
    count = len(tables[0])
    total_bytes = sum(_nbytes(t) for table in tables for t in table)
    budget = _queued_budget(tables) if len(jobs) > 1 else None
    done_bytes = 0
    for i in range(count):
        streams[0].prefetch(i + 1)
        groups = _groups([_nbytes(t[i]) for t in tables], budget)
        # The parent tensors of this index found finite (by info id) → their largest |x|.
        finite: dict[int, float | None] = {}
        for g, members in enumerate(groups):
            last_group = g == len(groups) - 1
            together = None
            checks = _OutputChecks(torch, [not jobs[j].allow_nonfinite for j in members])
            if len(members) > 1:
                _wait_for_room(writers, members[-1],
                               sum(_nbytes(tables[j][i]) for j in members), budget)
                streams[members[0]].drops = last_group
                together = _compute_together(
                    [jobs[j] for j in members], [tables[j][i] for j in members], readers,
                    [funcs[j] for j in members], [streams[j] for j in members], checks,
                    finite)
            for k, j in enumerate(members):
                job, task, stream, writer = jobs[j], tables[j][i], streams[j], writers[j]
                stream.drops = last_group and k == len(members) - 1
                if together is not None:
                    out = together[k]
                    together[k] = None
                else:
                    out = _compute(job, task, readers, funcs[j], device, torch, stream,
                                   checks, k, finite)
                if not checks.finite(k, out):
                    raise IncompatibleModelsError(
                        f"{job.method.name} produced NaN or Inf in {task.name} from finite "
                        "parents (its arithmetic overflowed)", node=job.node,
                        hint="check the node's parameters, or set allow_nonfinite: true")
                faults.point("engine.computed")
                stream.release(task)
                if budget is not None and together is None:
                    _wait_for_room(writers, j, _nbytes(task), budget)
                writer.write(task.name, out)
                del out
                done_bytes += _nbytes(task)
        if progress:
            progress(i + 1, count, done_bytes, total_bytes)
    return [writer.finish() for writer in writers]


def _groups(sizes: list[int], budget: int | None) -> list[list[int]]:
    """Consecutive jobs whose outputs of one tensor fit ``budget`` together (at least one
    job per group); every job alone without a budget (a single build)."""
    if budget is None:
        return [[j] for j in range(len(sizes))]
    groups: list[list[int]] = [[]]
    used = 0
    for j, size in enumerate(sizes):
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(j)
        used += size
    return groups


def _compute_together(jobs, tasks: list[TensorTask], readers, funcs, streams,
                      checks: _OutputChecks, finite: dict[int, float | None]) -> list | None:
    """Every job's output for one tensor from a single read of its inputs, when the jobs
    share the method and the inputs and the method can do that: an elementwise method
    (inputs converted once per chunk, the kernel run per job on copies) or one with a
    ``streamed_many`` kernel. None: each job computes its tensor alone. The outputs are
    checked for NaN/Inf span by span as they are written (``checks``)."""
    if len(jobs) < 2:
        return None
    lead, task = streams[0], tasks[0]
    method = jobs[0].method
    if (lead.device != "cpu" or any(j.method is not method for j in jobs)
            or task.dtype not in ARITHMETIC_CODES or method.passes_through
            or any(t.remap is not None or t.base is not task.base or t.inputs != task.inputs
                   or t.dtype != task.dtype for t in tasks)):
        return None
    params = [_resolve_params(job, t) for job, t in zip(jobs, tasks, strict=True)]
    load = partial(_load, readers, lead,
                   checked_for=None if all(j.allow_nonfinite for j in jobs) else jobs[0].node,
                   finite=finite)
    for k, (t, p) in enumerate(zip(tasks, params, strict=True)):
        checks.proof(k, partial(_bound_proves_finite, lead, t, p, finite))
    if lead.elementwise:
        return lead.compute_chunked_many(jobs, tasks, load, funcs, params, checks)
    many = lead.merge_streamed_many
    if many is not None and all(s.streams(t, p) for s, t, p in zip(streams, tasks, params,
                                                                     strict=True)):
        return lead.compute_streamed_many(jobs, tasks, load, many, params, checks)
    return None


def _queued_budget(tables) -> int:
    """Bytes of output tensors the writers of a fused pass may hold together: four of the
    largest tensors, at least 64 MB. Four, not two: the variants of the largest tensors (the
    embeddings) are then made in groups of four from one read of their inputs instead of
    pairs (an 8-variant SLERP sweep of the medium models took ~7 % less wall time), while
    the peak RSS stays ~1.4× one variant's (the issue's bound is 2×; eight at once reached
    1.95×)."""
    largest = max((_nbytes(t) for table in tables for t in table), default=0)
    return max(4 * largest, 64 * 2**20)


def _wait_for_room(writers, current: int, nbytes: int, budget: int) -> None:
    """Wait, oldest tensors first (the writers after ``current``, round the ring), until
    handing ``nbytes`` more keeps the writers' queued bytes within ``budget``."""
    n = len(writers)
    for step in range(1, n + 1):
        if sum(w.pending_bytes for w in writers) + nbytes <= budget:
            return
        writers[(current + step) % n].settle()


class _ParentHasher:
    """Hashes every file of the store-object parents (``published``, shared by every job of a
    pass) on a thread while the pass streams them, and compares with what the store published
    when the pass ends.

    Weight files are hashed through the very mappings the engine reads (opened first thing,
    so a parent replaced meanwhile is not what gets hashed), whole and in file order:
    headers, padding and tensors a slice skips included. The pages it touches become the
    engine's read-ahead; it drops them from this process again as it goes. Other files
    (config, tokenizer, index, card, provenance) are small and read by path.
    """

    _CHUNK = 8 * 2**20

    def __init__(self, published: Mapping[str, Mapping[str, str]],
                 parents: Mapping[str, Path], readers: Mapping[str, CheckpointReader],
                 built: str):
        self.published, self.parents, self.node = published, parents, built
        self.actual: dict[tuple[str, str], str] = {}
        self.error: BaseException | None = None
        self.stopped = False
        self.maps: dict[tuple[str, str], mmap.mmap] = {}
        for node in published:
            reader = readers[node]
            for path in CheckpointReader.weight_files(reader):
                self.maps[(node, path.name)] = CheckpointReader._map(reader, path)
        self.thread = threading.Thread(target=self._run, name="mergebuild-parent-hash",
                                       daemon=True)
        if published:
            self.thread.start()

    def _run(self) -> None:
        try:
            for node, files in self.published.items():
                for name in sorted(files):
                    if self.stopped:
                        return
                    mapped = self.maps.get((node, name))
                    path = Path(self.parents[node]) / name
                    self.actual[(node, name)] = (self._hash_mapped(mapped) if mapped is not None
                                                 else file_xxh128(path))
        except FileNotFoundError:
            return  # a missing file has no hash: finish() reports it as not matching
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
            self.error = exc

    def _hash_mapped(self, mapped: mmap.mmap) -> str:
        h = xxhash.xxh3_128()
        view = memoryview(mapped)
        try:
            for start in range(0, len(mapped), self._CHUNK):
                if self.stopped:
                    break
                h.update(view[start:start + self._CHUNK])
                # Dropping the pages only keeps resident memory down: a refusal is harmless.
                with contextlib.suppress(OSError, ValueError):
                    mapped.madvise(mmap.MADV_DONTNEED, start, min(self._CHUNK, len(mapped) - start))
        finally:
            view.release()
        return "xxh128:" + h.hexdigest()

    def stop(self) -> None:
        self.stopped = True
        if self.thread.is_alive():
            self.thread.join()

    def finish(self) -> None:
        """Wait for the hashes; CorruptParentError naming the parent and the first file whose
        bytes differ from what the store published."""
        if not self.published:
            return
        self.thread.join()
        if self.error is not None:
            raise self.error
        for node, files in self.published.items():
            for name, expected in sorted(files.items()):
                if self.actual.get((node, name)) != expected:
                    raise CorruptParentError(
                        f"parent '{node}' is corrupt in the store: {name} is not what was "
                        "published", parent=node, file=name, node=self.node,
                        hint="it was moved aside; run make again to rebuild it")


# Elements checked at a time: the check's scratch stays in cache whatever the tensor.
_FINITE_CHUNK = 1 << 18
# Floating dtype → (integer dtype of its width, every bit but the sign, the exponent's bits):
# a value is NaN or Inf exactly when its exponent bits are all set, i.e. when its bit pattern
# without the sign is at least the exponent's. An integer AND and max run ~10× faster than
# ``isfinite`` on bf16 (which converts element by element) and make no bool temporaries.
_EXPONENT_BITS = {
    "bfloat16": ("int16", 0x7FFF, 0x7F80),
    "float16": ("int16", 0x7FFF, 0x7C00),
    "float32": ("int32", 0x7FFF_FFFF, 0x7F80_0000),
    "float64": ("int64", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
}


def _all_finite(torch, tensor: Any) -> bool:
    """Whether a floating tensor holds no NaN or Inf (other dtypes always do)."""
    largest = _magnitude(torch, tensor)
    return largest is None or largest < math.inf


def _magnitude(torch, tensor: Any) -> float | None:
    """The largest |x| of a floating tensor (0.0 for other dtypes), inf when it holds NaN or
    Inf, None when it is finite but its largest |x| was not worked out; checked in chunks as
    it streams by: on the bit patterns where the dtype's are IEEE's (where the pattern
    without the sign orders the values by magnitude, so its maximum is the largest |x| for
    free), else with ``isfinite``."""
    if not tensor.is_floating_point():
        return 0.0
    flat = tensor.reshape(-1)
    n = flat.numel()
    layout = _EXPONENT_BITS.get(str(tensor.dtype).removeprefix("torch."))
    if layout is None or tensor.device.type != "cpu" or not flat.is_contiguous():
        finite = all(bool(torch.isfinite(flat[s:s + _FINITE_CHUNK]).all())
                     for s in range(0, n, _FINITE_CHUNK))
        return None if finite else math.inf
    int_dtype, magnitude, exponent = layout
    bits = flat.view(getattr(torch, int_dtype))
    scratch = torch.empty(min(n, _FINITE_CHUNK), dtype=bits.dtype)
    largest = 0
    for s in range(0, n, _FINITE_CHUNK):
        e = min(n, s + _FINITE_CHUNK)
        top = int(torch.bitwise_and(bits[s:e], magnitude, out=scratch[:e - s]).max())
        if top >= exponent:
            return math.inf
        largest = max(largest, top)
    return float(torch.tensor([largest], dtype=bits.dtype).view(tensor.dtype)[0])


# The largest finite value of each output dtype. A method's ``bound`` on the exact values
# of a merge (every intermediate and the result) proves its output finite when twice the
# bound stays below the output's largest value (and float32's: the arithmetic's): the
# rounding of the float32 operations, 2^-24 relative each, cannot cover that factor of 2.
_LARGEST = {"bfloat16": 3.3895313892515355e38, "float16": 65504.0,
            "float32": 3.4028234663852886e38, "float64": 3.4028234663852886e38}


def _span_finite(torch, span: Any, scratch) -> bool:
    """``_all_finite`` of one contiguous CPU span, with ``scratch(dtype)`` a reused buffer
    (a span longer than it is checked by ``_all_finite``): for the merge threads, which check
    what they just wrote while it is still in cache."""
    layout = _EXPONENT_BITS.get(str(span.dtype).removeprefix("torch."))
    if layout is None:
        return bool(torch.isfinite(span).all())
    int_dtype, magnitude, exponent = layout
    itype = getattr(torch, int_dtype)
    buffer = scratch(itype)
    if buffer.numel() < span.numel():  # a span longer than the workspace's chunk
        return _all_finite(torch, span)
    out = buffer[: span.numel()]
    return int(torch.bitwise_and(span.view(itype), magnitude, out=out).max()) < exponent


class _OutputChecks:
    """The NaN/Inf check of one tensor's outputs (one per job of a group), made where it is
    cheapest.

    A path that merges by spans on worker threads ``watch``es its outputs and calls ``span``
    on the worker right after every watched output's span [s, e) is written: the check then
    reads bytes still in cache, on every core, instead of the whole tensor again from memory
    on the main thread (~1 s of an 8-variant linear sweep's 10). ``finite`` gives that
    verdict when the spans covered the whole output, and otherwise checks the output whole.
    An output its method's bound proves finite from the parents' magnitudes (``proof``) is
    not checked at all.
    """

    def __init__(self, torch, wanted: Sequence[bool]):
        self.torch, self.wanted = torch, list(wanted)
        self.flats: list[Any] = [None] * len(self.wanted)
        self.bad = [False] * len(self.wanted)
        self.covered = [0] * len(self.wanted)
        self.proofs: list[Callable[[], bool] | None] = [None] * len(self.wanted)
        self.lock = threading.Lock()

    def watch(self, k: int, flat: Any) -> None:
        """Check output ``k`` (its flat view) span by span, unless it is proven finite."""
        self._settle(k)
        if self.wanted[k] and flat.device.type == "cpu" and flat.is_contiguous():
            self.flats[k] = flat

    def proof(self, k: int, proves: Callable[[], bool]) -> None:
        """``proves()`` may prove output ``k`` finite (a method's bound, once the parents'
        magnitudes are known: it is asked when the output is watched or judged, after the
        parents were loaded); a proven output is not checked."""
        self.proofs[k] = proves

    def _settle(self, k: int) -> None:
        proves, self.proofs[k] = self.proofs[k], None
        if proves is not None and self.wanted[k] and proves():
            self.wanted[k] = False

    def span(self, s: int, e: int, workspace) -> None:
        """Elements [s, e) of every watched output are written: check them (on the calling
        worker thread, with its scratch; ``e - s`` is at most the workspace's chunk)."""
        scratch = partial(_finite_scratch, workspace)
        for k, flat in enumerate(self.flats):
            if flat is None:
                continue
            if not self.bad[k] and not _span_finite(self.torch, flat[s:e], scratch):
                self.bad[k] = True
            with self.lock:
                self.covered[k] += e - s

    def finite(self, k: int, out: Any) -> bool:
        """Whether output ``k`` holds no NaN or Inf (always true where it was not wanted or
        is proven finite)."""
        self._settle(k)
        if not self.wanted[k]:
            return True
        if self.flats[k] is not None and self.covered[k] == self.flats[k].numel():
            return not self.bad[k]
        return _all_finite(self.torch, out)


def _finite_scratch(workspace, dtype: Any) -> Any:
    return workspace.buffer(("finite", dtype), dtype)


def _nbytes(task: TensorTask) -> int:
    return math.prod(task.shape) * dtype_size(task.dtype)


def _stat_weights(reader: CheckpointReader) -> list[tuple[str, tuple[int, int, int, int]]]:
    return [(str(p), stat_signature(p)) for p in reader.weight_files()]


# An elementwise method is fed cache-sized chunks instead of whole float32 tensors (same
# bytes, far less memory).
_CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32 per input: stays in cache, bounds memory
_PAGE = mmap.PAGESIZE
# Streamed kernels free to choose their chunking: 1 MB float32 chunks spread over the worker
# threads (a 2.9 M-element MLP matrix is 12 chunks, so both cores get work), from 64 K
# elements up.
_STREAM_CHUNK = 1 << 18
_STREAM_MIN_ELEMENTS = 1 << 16
_WRITER_LAG = 8  # > CheckpointWriter's queue (4) + the tensor being written
# Output tensors from this size up are made in reused buffers (smaller ones come from the
# allocator's heap, already faulted in).
_REUSE_MIN_BYTES = 1 << 20


def _set_threads(torch) -> None:
    """Intra-op threads: one core fewer than this process may use (at least one).

    The writer thread needs a core of its own for sha256 and pwrite, and the engine's
    operations are on cache-sized chunks where a second intra-op thread gains little; on the
    2-core machine of benchmarks/ a linear merge took 6.4 s with one thread and 11–14 s
    with two (other processes were competing for the cores).
    """
    threads = max(1, _cores() - 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _workers() -> int:
    """Compute threads of the streamed methods: every core this process may use (at most 8:
    each holds ~12 MB of scratch, and the passes are memory-bound beyond that)."""
    return min(8, _cores())


def _cores() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _resolve_params(job: BuildJob, task: TensorTask) -> TensorParams:
    globals_ = job.global_parameters if task.globals is None else task.globals
    return TensorParams(
        tensor_name=task.name,
        globals=_resolve(globals_, task),
        parents=tuple(_resolve(p, task) for p in task.parameters),
    )


class _Scratch:
    """Reused float32 buffers, one per input slot.

    A fresh multi-hundred-MB tensor costs its first-touch page faults on every tensor (seconds
    per model); converting into an already-touched buffer is ~10× cheaper. On CUDA the input
    goes through a pinned host buffer (per slot) with an asynchronous host-to-device copy,
    and a CUDA event per slot is waited on before that pinned buffer is written again, so
    reuse is safe by construction, not by luck.
    """

    def __init__(self, torch, device: str, capacity: int):
        self.torch, self.device, self.capacity = torch, device, max(1, capacity)
        self.buffers: dict[int, Any] = {}
        self.pinned: dict[int, Any] = {}
        self.events: dict[int, Any] = {}  # slot → CUDA event of its last async copy
        self.cuda = device.startswith("cuda")

    def reserve(self, slot: int, n: int) -> Any:
        """The first ``n`` elements of slot's float32 buffer (flat), growing it if needed."""
        buf = self.buffers.get(slot)
        if buf is None or buf.numel() < n:
            self.buffers.pop(slot, None)  # free the old buffer before the new one is touched
            buf = self.torch.empty(max(n, self.capacity), dtype=self.torch.float32,
                                   device=self.device)
            self.buffers[slot] = buf
        return buf[:n]

    def convert_into(self, slot: int, out: Any, src: Any) -> None:
        """``out.copy_(src)``; on CUDA through slot's pinned buffer, asynchronously."""
        if not self.cuda or src.device.type != "cpu":
            out.copy_(src)
            return
        torch = self.torch
        need = src.numel() * src.element_size()
        stage = self.pinned.get(slot)
        pending = self.events.pop(slot, None)
        if pending is not None:
            pending.synchronize()  # the previous copy out of this pinned buffer has finished
        if stage is None or stage.numel() < need:
            stage = torch.empty(max(need, self.capacity * 4), dtype=torch.uint8, pin_memory=True)
            self.pinned[slot] = stage
        host = stage[:need].view(src.dtype).view(src.shape)
        host.copy_(src)
        out.copy_(host, non_blocking=True)  # converted to float32 on the device
        event = torch.cuda.Event()
        event.record()
        self.events[slot] = event

    def float32(self, slot: int, src: Any) -> Any:
        """``src`` converted to float32 into slot's buffer (shaped like ``src``)."""
        out = self.reserve(slot, src.numel()).view(src.shape)
        self.convert_into(slot, out, src)
        return out

    def done(self) -> None:
        for event in self.events.values():
            event.synchronize()
        self.events.clear()

    def owns(self, tensor: Any) -> bool:
        ptr = tensor.untyped_storage().data_ptr()
        return any(b.untyped_storage().data_ptr() == ptr for b in self.buffers.values())

    def nbytes(self) -> int:
        return sum(b.numel() * 4 for b in self.buffers.values()) + sum(
            p.numel() for p in self.pinned.values())


class _OutputBuffers:
    """Reused CPU memory for output tensors, handed back by the writers once written.

    A fresh output tensor of a few MB or more is a fresh mapping whose pages fault in as the
    merge writes it (~0.3 s per 577 MB model on the benchmark machine), and a fused pass
    would pay that once per variant. A buffer comes back (``release``, from the writer's
    thread) once its bytes are written and hashed; a request takes the smallest free buffer
    that fits. At most ``keep`` bytes of free buffers are kept; the rest are let go.
    """

    def __init__(self, torch, keep: int):
        self.torch, self.keep = torch, keep
        self.free: list[Any] = []  # uint8 tensors
        self.lent: dict[int, Any] = {}  # data pointer → the buffer behind a lent tensor
        self.lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """An uninitialised CPU tensor, from a free buffer when one fits."""
        torch = self.torch
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < _REUSE_MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.numel() >= nbytes]
            best = min(fits, key=lambda i: self.free[i].numel()) if fits else None
            buffer = self.free.pop(best) if best is not None else None
        if buffer is None:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        with self.lock:
            self.lent[buffer.data_ptr()] = buffer
        return buffer[:nbytes].view(dtype).view(shape)

    def release(self, tensor: Any) -> None:
        """Take back the buffer behind ``tensor`` (written: nothing reads it any more);
        tensors not lent from here are ignored."""
        with self.lock:
            buffer = self.lent.pop(tensor.data_ptr(), None)
            kept = sum(b.numel() for b in self.free)
            if buffer is not None and kept + buffer.numel() <= self.keep:
                self.free.append(buffer)


class _SharedScratch:
    """The scratch of one pass: reused buffers and worker threads, shared by every job of a
    fused pass (jobs run one after another per tensor, so no two use them at once), and the
    output buffers the writers hand back."""

    def __init__(self, torch, device: str, keep_outputs: int):
        self.torch, self.device = torch, device
        self.outputs = _OutputBuffers(torch, keep_outputs)
        self.whole = _Scratch(torch, device, 1)
        self.chunks = _Scratch(torch, device, _CHUNK_ELEMENTS)
        self.workspaces: dict[int, Any] = {}  # chunk elements → ChunkWorkspace

    def need_whole(self, elements: int) -> None:
        self.whole.capacity = max(self.whole.capacity, elements)

    def workspace(self, chunk: int) -> Any:
        from mergebuild.methods.chunks import ChunkWorkspace

        if chunk not in self.workspaces:
            self.workspaces[chunk] = ChunkWorkspace(_workers(), chunk)
        return self.workspaces[chunk]

    def peak_bytes(self) -> int:
        streamed = sum(w.nbytes() for w in self.workspaces.values())
        return self.whole.nbytes() + self.chunks.nbytes() + streamed

    def close(self) -> None:
        for workspace in self.workspaces.values():
            workspace.close()


class _Streaming:
    """One job's view of a pass's tensor stream: page hints and how its method computes."""

    def __init__(self, job: BuildJob, tasks: list[TensorTask], readers, device: str, torch,
                 shared: _SharedScratch):
        self.torch, self.device, self.job = torch, device, job
        self.tasks, self.readers = tasks, readers
        self.by_file = {str(d): n for n, r in readers.items() for d in r.weight_files()}
        method = job.method
        self.elementwise = method.elementwise
        self.recent: deque[TensorTask] = deque()
        largest = max((math.prod(t.shape) for t in tasks), default=1)
        # A streamed method sends only tiny tensors through whole-tensor scratch: size it by
        # need, not by the largest tensor.
        streamed = method.streamed is not None and device == "cpu"
        shared.need_whole(1 if self.elementwise or streamed else largest)
        self.shared = shared
        self.whole, self.chunks = shared.whole, shared.chunks
        self.out_dtype = {code: torch_dtype(code) for code in ARITHMETIC_CODES}
        self.merge_streamed = method.load_streamed() if streamed else None
        self.merge_streamed_many = method.load_streamed_many() if streamed else None
        self.merge_elementwise_many = method.load_elementwise_many() if self.elementwise else None
        self.bound = method.load_bound()
        self.drops = True  # whether this job reads a tensor last (and may drop its pages)

    def _mapped(self, info: TensorInfo):
        for reader in self.readers.values():
            mapped = getattr(reader, "_maps", {}).get(info.file)
            if mapped is not None:
                return mapped
        return None

    def _ranges(self, task: TensorTask):
        for info in (*task.inputs, *((task.base,) if task.base else ())):
            mapped = self._mapped(info)
            if mapped is not None:
                start = info.start - info.start % _PAGE
                yield mapped, start, info.end - start

    def drop_pages(self, info: TensorInfo | None, first: int, stop: int) -> None:
        """Unmap elements [first, stop) of a parent's tensor once they are converted."""
        mapped = self._mapped(info) if info is not None and self.drops else None
        if mapped is None:
            return
        size = dtype_size(info.dtype)
        lo, hi = info.start + first * size, info.start + stop * size
        lo -= lo % _PAGE
        try:
            mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass

    def drop_spans(self, task: TensorTask, start: int, stop: int) -> None:
        """Unmap elements [start, stop) of every input of ``task`` (read for the last time)."""
        for info in (*task.inputs, task.base):
            self.drop_pages(info, start, stop)

    def _advise(self, task: TensorTask, advice: int) -> None:
        for mapped, start, length in self._ranges(task):
            try:
                mapped.madvise(advice, start, length)
            except (OSError, ValueError):
                return  # only a hint

    def prefetch(self, index: int) -> None:
        """Ask the kernel to read the next tensor's pages ahead (a no-op when cached)."""
        if index < len(self.tasks):
            self._advise(self.tasks[index], mmap.MADV_WILLNEED)

    def release(self, task: TensorTask) -> None:
        """Unmap a finished tensor's pages from this process (they stay in the page cache),
        so resident memory follows the tensor being merged, not the bytes read so far."""
        self.whole.done()
        self.chunks.done()
        if not self.drops:
            return
        self._advise(task, mmap.MADV_DONTNEED)
        # A zero-copy output (passthrough) is read by the writer thread after this point and
        # maps its pages back in; the writer queue is bounded, so once _WRITER_LAG more
        # tensors were handed over that write is done: drop those pages again then.
        self.recent.append(task)
        if len(self.recent) > _WRITER_LAG:
            self._advise(self.recent.popleft(), mmap.MADV_DONTNEED)

    def owns(self, tensor: Any) -> bool:
        return self.whole.owns(tensor) or self.chunks.owns(tensor)

    def load_float32(self, slot: int, info: TensorInfo, src: Any) -> Any:
        """A whole tensor as float32 in its slot's scratch, converted a chunk at a time so
        the parent's mapped pages are dropped as soon as they are read."""
        flat_src = src.reshape(-1)
        n = flat_src.numel()
        out = self.whole.reserve(slot, n)
        step = 16 * _CHUNK_ELEMENTS
        for s in range(0, n, step):
            e = min(n, s + step)
            self.whole.convert_into(slot, out[s:e], flat_src[s:e])
            self.drop_pages(info, s, e)
        return out.view(src.shape)

    def chunk_workspace(self) -> Any:
        """The pass's worker threads and their scratch, in the chunks the method's streamed
        kernel is defined over (or the engine's choice)."""
        return self.shared.workspace(self.job.method.stream_chunk or _STREAM_CHUNK)

    def streams(self, task: TensorTask, params: TensorParams) -> bool:
        """Whether a tensor goes through the method's streamed kernel (CPU, mmapped parents;
        tiny tensors are cheaper whole, with the same bytes)."""
        return (self.merge_streamed is not None and task.remap is None
                and task.base is not None
                and all(i.dtype in ARITHMETIC_CODES for i in (task.base, *task.inputs))
                and math.prod(task.shape) >= _STREAM_MIN_ELEMENTS
                and self.job.method.streamable(params))

    def _consumed(self, task: TensorTask, checks: _OutputChecks, ws, s: int, e: int) -> None:
        """A streamed kernel's ``consumed(s, e)``: [s, e) of the inputs is read for the last
        time and of every output written (the kernels call it after writing the span):
        check the outputs' span while it is in cache, then drop the inputs' pages."""
        checks.span(s, e, ws)
        self.drop_spans(task, s, e)

    def compute_streamed(self, task: TensorTask, load, params: TensorParams,
                         checks: _OutputChecks, k: int) -> Any:
        """The method's streamed kernel over chunks of the mmapped parents, on every core;
        the output is checked (``checks``, as job ``k``) span by span as it is written."""
        srcs = [load(info).reshape(-1) for info in task.inputs]
        base = load(task.base).reshape(-1)
        out = self.shared.outputs.empty(task.shape, self.out_dtype[task.dtype])
        seed = tensor_seed(self.job.key, task.name) if self.job.method.randomized else None
        ws = self.chunk_workspace()
        checks.watch(k, out.view(-1))
        try:
            self.merge_streamed(srcs, base, params, seed, out.view(-1), ws,
                                partial(self._consumed, task, checks, ws))
        except ValueError as exc:
            raise IncompatibleModelsError(
                f"{self.job.method.name} failed on {task.name}: {exc}", node=self.job.node,
            ) from None
        return out

    def compute_streamed_many(self, jobs, tasks: list[TensorTask], load, many,
                              params: list[TensorParams], checks: _OutputChecks) -> list:
        """Every job's tensor through the method's ``streamed_many`` kernel, in one pass,
        checked span by span (``checks``)."""
        task = tasks[0]
        srcs = [load(info).reshape(-1) for info in task.inputs]
        base = load(task.base).reshape(-1)
        outs = [self.shared.outputs.empty(task.shape, self.out_dtype[task.dtype])
                for _ in jobs]
        seeds = [tensor_seed(job.key, t.name) if job.method.randomized else None
                 for job, t in zip(jobs, tasks, strict=True)]
        ws = self.chunk_workspace()
        for k, o in enumerate(outs):
            checks.watch(k, o.view(-1))
        try:
            many(srcs, base, params, seeds, [o.view(-1) for o in outs], ws,
                 partial(self._consumed, task, checks, ws))
        except ValueError as exc:
            raise IncompatibleModelsError(
                f"{self.job.method.name} failed on {task.name}: {exc}",
                node=", ".join(job.node for job in jobs)) from None
        return outs

    def compute_chunked_many(self, jobs, tasks: list[TensorTask], load, funcs,
                             params: list[TensorParams], checks: _OutputChecks) -> list:
        """An elementwise method for several jobs: each chunk of the inputs converted to
        float32 once, then every job's result written into its output from it, by the
        method's ``elementwise_many`` kernel (which leaves the chunks as they are) or else
        by each job's kernel on its own copy (kernels may work in place); each chunk of the
        outputs is checked for NaN/Inf right after it is written (``checks``)."""
        torch = self.torch
        task = tasks[0]
        srcs = [load(info).reshape(-1) for info in task.inputs]
        base = load(task.base).reshape(-1) if task.base else None
        outs = [self.shared.outputs.empty(task.shape, self.out_dtype[task.dtype])
                for _ in tasks]
        flats = [o.view(-1) for o in outs]
        n = flats[0].numel()
        ws = self.chunk_workspace()
        last = len(tasks) - 1
        many = self.merge_elementwise_many
        for k, flat in enumerate(flats):
            checks.watch(k, flat)

        def one(span: tuple[int, int]) -> None:
            s, e = span
            shared = [ws.buffer(("in", k), torch.float32)[: e - s].copy_(x[s:e])
                      for k, x in enumerate(srcs)]
            b = (ws.buffer(("in", len(srcs)), torch.float32)[: e - s].copy_(base[s:e])
                 if base is not None else None)
            self.drop_spans(task, s, e)
            if many is not None:
                try:
                    many(shared, b, params, [flat[s:e] for flat in flats],
                         ws.buffer("many", torch.float32)[: e - s])
                except ValueError as exc:
                    raise IncompatibleModelsError(
                        f"{self.job.method.name} failed on {task.name}: {exc}",
                        node=", ".join(job.node for job in jobs)) from None
                checks.span(s, e, ws)
                return
            for j, (t, func, p, flat) in enumerate(zip(tasks, funcs, params, flats,
                                                        strict=True)):
                if j == last:
                    parents, job_base = shared, b
                else:
                    parents = [ws.buffer(("job", k), torch.float32)[: e - s].copy_(x)
                               for k, x in enumerate(shared)]
                    job_base = (ws.buffer(("job", len(shared)), torch.float32)[: e - s]
                                .copy_(b) if b is not None else None)
                try:
                    r = func(parents, job_base, p, None)
                except ValueError as exc:
                    raise IncompatibleModelsError(
                        f"{self.job.method.name} failed on {t.name}: {exc}",
                        node=self.job.node) from None
                flat[s:e].copy_(r)
            checks.span(s, e, ws)

        ws.run(one, [(s, min(n, s + ws.chunk)) for s in range(0, n, ws.chunk)])
        return outs

    def compute_chunked(self, task: TensorTask, load, func, params: TensorParams,
                        checks: _OutputChecks, k: int) -> Any:
        """An elementwise method over cache-sized chunks, written into one output tensor
        (on the CPU checked chunk by chunk, as job ``k`` of ``checks``)."""
        torch = self.torch
        srcs = [load(info).reshape(-1) for info in task.inputs]
        base = load(task.base).reshape(-1) if task.base else None
        if self.device == "cpu":
            out = self.shared.outputs.empty(task.shape, self.out_dtype[task.dtype])
        else:
            out = torch.empty(task.shape, dtype=self.out_dtype[task.dtype], device=self.device)
        flat = out.view(-1)
        n = flat.numel()
        slot_base = len(srcs)
        if self.device == "cpu" and n > _STREAM_CHUNK:
            checks.watch(k, flat)
            self._chunks_in_parallel(task, srcs, base, flat, func, params, checks)
            return out
        for s in range(0, n, _CHUNK_ELEMENTS):
            e = min(n, s + _CHUNK_ELEMENTS)
            parents = [self.chunks.float32(k, x[s:e]) for k, x in enumerate(srcs)]
            b = self.chunks.float32(slot_base, base[s:e]) if base is not None else None
            self._merge_span(task, parents, b, s, e, func, params, flat)
        return out.cpu()

    def _merge_span(self, task: TensorTask, parents, b, s: int, e: int, func,
                    params: TensorParams, flat) -> None:
        """Merge elements [s, e) already converted to float32 into ``flat``; the parents'
        pages behind them are dropped first (they are not read again)."""
        self.drop_spans(task, s, e)
        try:
            r = func(parents, b, params, None)
        except ValueError as exc:
            raise IncompatibleModelsError(
                f"{self.job.method.name} failed on {task.name}: {exc}", node=self.job.node,
            ) from None
        flat[s:e].copy_(r)


    def _chunks_in_parallel(self, task: TensorTask, srcs, base, flat, func,
                            params: TensorParams, checks: _OutputChecks) -> None:
        """``compute_chunked`` on the CPU, its chunks spread over the workspace's threads
        (an elementwise method's result does not depend on how it is chunked)."""
        torch = self.torch
        ws = self.chunk_workspace()
        n = flat.numel()

        def one(span: tuple[int, int]) -> None:
            s, e = span
            parents = [ws.buffer(("in", k), torch.float32)[: e - s].copy_(x[s:e])
                       for k, x in enumerate(srcs)]
            b = (ws.buffer(("in", len(srcs)), torch.float32)[: e - s].copy_(base[s:e])
                 if base is not None else None)
            self._merge_span(task, parents, b, s, e, func, params, flat)
            checks.span(s, e, ws)

        ws.run(one, [(s, min(n, s + ws.chunk)) for s in range(0, n, ws.chunk)])


def _load(readers, stream: _Streaming, info: TensorInfo, checked_for: str | None = None,
          finite: dict[int, float | None] | None = None):
    """A parent tensor as a view of its mapped file; with ``checked_for`` (the node being
    built) one holding NaN or Inf stops the build, naming node, parent and tensor. ``finite``
    maps the ids of the tensor infos already found finite in this pass (a fused pass's
    groups read the same parent tensor again) to their largest |x| (``_magnitude``): those
    are not checked twice, and the magnitudes feed the methods' bounds
    (``_bound_proves_finite``)."""
    # By identity first: "base" and "base+lora" share files but not readers.
    reader = next((r for r in readers.values() if r.tensors.get(info.name) is info),
                  None) or readers[stream.by_file[str(info.file)]]
    tensor = reader.load(info.name)
    faults.point("engine.read_tensor")
    if checked_for is None or finite is not None and id(info) in finite:
        return tensor
    largest = _magnitude(stream.torch, tensor)
    if largest == math.inf:
        parent = next((n for n, r in readers.items() if r is reader), "?")
        raise CheckpointError(
            f"parent '{parent}' holds NaN or Inf in {info.name}; merging would spread it",
            node=checked_for, hint="fix the parent, or set allow_nonfinite: true on the node "
                                   "(or make --allow-nonfinite) to merge it anyway")
    if finite is not None:
        finite[id(info)] = largest
    return tensor


def _bound_proves_finite(stream: _Streaming, task: TensorTask, params: TensorParams,
                         finite: dict[int, float | None]) -> bool:
    """Whether ``task``'s method's ``bound`` on the merge's values, given its parents' largest
    |x| (recorded by ``_load`` as it checked them), proves the output finite (see
    ``_LARGEST``). A method without a bound, a parent of unknown magnitude or parameters the
    bound rejects prove nothing."""
    if stream.bound is None or task.remap is not None:
        return False
    infos = (*task.inputs, *((task.base,) if task.base else ()))
    largest = [finite.get(id(info)) for info in infos]
    if any(m is None for m in largest):
        return False
    try:
        bound = stream.bound(largest[:len(task.inputs)],
                             largest[-1] if task.base else None, params)
    except ValueError:
        return False  # the kernel reports the parameters' problem itself
    limit = min(_LARGEST.get(str(stream.out_dtype[task.dtype]).removeprefix("torch."), 0.0),
                _LARGEST["float32"])
    return bound is not None and 2 * bound < limit


def _compute(job: BuildJob, task: TensorTask, readers, func, device: str, torch,
             stream: _Streaming, checks: _OutputChecks, k: int,
             finite: dict[int, float | None]) -> Any:
    """Job's output tensor for ``task`` alone; the chunked and streamed paths check it for
    NaN/Inf as they write it (as job ``k`` of ``checks``), unless its method's bound proves
    it finite (``_bound_proves_finite``)."""
    load = partial(_load, readers, stream,
                   checked_for=None if job.allow_nonfinite else job.node, finite=finite)

    if (len(task.inputs) == 1 and task.base is None and task.remap is None
            and job.method.passes_through):
        scale = _resolve(task.parameters[0], task).get("scale", 1.0)
        x = load(task.inputs[0])
        if scale == 1.0 or task.dtype not in ARITHMETIC_CODES:
            out = x
        else:
            out = x.to(device=device, dtype=torch.float32) * float(scale)
        return out.to(dtype=torch_dtype(task.dtype)
                      if task.dtype in ARITHMETIC_CODES else out.dtype).cpu()

    if task.dtype not in ARITHMETIC_CODES:
        return load(task.inputs[0] if task.inputs else task.base).clone()
    checks.proof(k, partial(_bound_proves_finite, stream, task, _resolve_params(job, task),
                            finite))
    if stream.elementwise and task.remap is None:
        return stream.compute_chunked(task, load, func, _resolve_params(job, task), checks, k)
    if stream.streams(task, _resolve_params(job, task)):
        return stream.compute_streamed(task, load, _resolve_params(job, task), checks, k)
    # Copies into reused scratch: the methods' in-place arithmetic is safe there too.
    parents = [stream.load_float32(k, info, load(info)) for k, info in enumerate(task.inputs)]
    base = (stream.load_float32(len(task.inputs), task.base, load(task.base)) if task.base
            else None)
    if task.remap is not None:
        parents, base = task.remap(parents, base)
    params = _resolve_params(job, task)
    generator = None
    if job.method.randomized:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(tensor_seed(job.key, task.name))
    try:
        out = func(parents, base, params, generator)
    except ValueError as exc:
        raise IncompatibleModelsError(f"{job.method.name} failed on {task.name}: {exc}",
                                      node=job.node) from None
    result = out.to(dtype=torch_dtype(task.dtype)).cpu()
    # The writer keeps what it is given: never hand it (a view of) a reused scratch buffer.
    return result.clone() if stream.owns(result) else result


def _copy_support_files(job: BuildJob, readers, out_dir: Path,
                        untie_head: bool = False) -> dict[str, tuple[str, int]]:
    """Config and tokenizer from the donor; config adjusted for slices, an output head the
    tied donor lacks (``untie_head``) and dtype."""
    import hashlib

    donor_dir = Path(job.parents[job.donor])
    written: dict[str, tuple[str, int]] = {}

    def put(name: str, data: bytes) -> None:
        path = out_dir / name
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        written[name] = (hashlib.sha256(data).hexdigest(), len(data))
        faults.point("engine.support_file")

    config = dict(readers[job.donor].config or {})
    config_file = donor_dir / "config.json"
    if config_file.is_symlink() and not _inside(config_file, _link_root(donor_dir)):
        config = {}  # a config.json linking out of the model directory is not copied
    if config:
        stack = None
        if job.slices is not None:
            stack = [StackedRange(readers[node].config or {}, start, end)
                     for node, (start, end), _ in (s.sources[0] for s in job.slices)]
        config = output_config(config, stack=stack, untie_head=untie_head,
                               out_dtype=job.out_dtype)
        put("config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    template = None
    if job.chat_template is not None:
        template = expand_template(job.chat_template,
                                   (parent_chat_template(Path(d)) for d in job.parents.values()))
    for name in (*[c for c in CONFIG_FILES if c != "config.json"], *TOKENIZER_FILES):
        src = donor_dir / name
        # Never follow a link out of the donor directory (a Hugging Face cache snapshot
        # links into its repo's blobs/, which counts as inside).
        if not src.is_file() or src.is_symlink() and not _inside(src, _link_root(donor_dir)):
            continue
        limit = CONFIG_MAX_BYTES if name in CONFIG_FILES else TOKENIZER_MAX_BYTES
        try:
            if name == "tokenizer_config.json" and template is not None:
                data = read_json_bounded(src, limit)
                data["chat_template"] = template
                put(name, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
                continue
            if name == "chat_template.jinja" and template is not None:
                put(name, template.encode())  # transformers reads this file before the config
                continue
            put(name, read_bytes_bounded(src, limit))
        except (ValueError, TypeError) as exc:  # too large, or not the JSON object it must be
            raise CheckpointError(f"{name} of '{job.donor}' is unusable: {exc}",
                                  node=job.node, hint="fix or re-download it") from None
    return written


def parent_chat_template(directory: Path) -> str | None:
    """A model directory's chat template (chat_template.jinja, else tokenizer_config.json's;
    a named set's "default"), or None."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = read_json_bounded(config, TOKENIZER_MAX_BYTES).get("chat_template")
    except (OSError, ValueError, AttributeError):  # unreadable, too large, not an object
        return None
    if isinstance(template, list):  # [{name, template}, ...]
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _link_root(directory: Path) -> Path:
    """Where a model directory's symlinks may point: itself, or for an HF cache snapshot
    (``models--org--name/snapshots/<commit>``) the repo directory holding ``blobs/``."""
    return snapshot_repo_dir(directory) or directory


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


__all__ = ["BuildJob", "BuildOutput", "Participant", "SliceInput", "plan_tensors", "run_build",
           "select_device", "tensor_seed"]
