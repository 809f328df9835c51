"""Assembling a BuildJob from a merge spec and its planned parents: participants, slices,
donor, output dtype, shard size, device, then the parents' directories and adapters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mergebuild.errors import CheckpointError
from mergebuild.methods.registry import Method
from mergebuild.plan.recipe import donor, global_parameters, parent_parameters
from mergebuild.plan.staleness import NodeState
from mergebuild.sources.resolve import adapter_directory, fetch_adapter, materialize
from mergebuild.spec.model import AdaptedSpec, Mergefile, MergeSpec
from mergebuild.spec.validate import participants, slice_base
from mergebuild.store.objects import Store

if TYPE_CHECKING:
    from mergebuild.build.compat import ModelMetadata
    from mergebuild.build.engine import BuildJob

DEFAULT_SHARD_BYTES = 5 * 2**30


def assemble_job(mergefile: Mergefile, spec: MergeSpec, method: Method, key: str,
                 device: str | None, allow_nonfinite: bool = False) -> BuildJob:
    """What to build for ``spec``, its parents not yet located (see :func:`with_parents`)."""
    from mergebuild.build.engine import BuildJob, Participant, SliceInput

    slices = None
    if spec.slices is not None:
        slices = tuple(
            SliceInput(
                sources=tuple(
                    (src.ref, src.layer_range,
                     parent_parameters(method, spec, src.parameters, s.parameters))
                    for src in s.sources),
                base=slice_base(spec, s, method),
                global_parameters=global_parameters(method, spec, s.parameters),
            )
            for s in spec.slices
        )
    return BuildJob(
        node=spec.name, key=key, method=method, parents={},
        participants=tuple(Participant(ref, parent_parameters(method, spec, params))
                           for ref, params in participants(spec, method)),
        base=spec.base, donor=donor(spec),
        global_parameters=global_parameters(method, spec),
        out_dtype=spec.dtype or mergefile.defaults.dtype,
        slices=slices, chat_template=spec.chat_template,
        tokenizer_source=spec.tokenizer_source,
        pad_vocab_to=spec.tokenizer.pad_to_multiple_of if spec.tokenizer else None,
        tokens=spec.tokenizer.tokens if spec.tokenizer else (),
        max_shard_bytes=mergefile.defaults.max_shard_size or DEFAULT_SHARD_BYTES,
        device=device or mergefile.defaults.device,
        allow_nonfinite=allow_nonfinite or spec.allow_nonfinite,
    )


def adapted_model_dir(mergefile: Mergefile, ref: str, states: dict[str, NodeState]) -> Path:
    """The store directory of the merge an adapted parent ``ref`` reads through its LoRA."""
    spec = mergefile.nodes[ref]
    assert isinstance(spec, AdaptedSpec)
    path = states[spec.model].path
    assert path is not None  # built before its children, in build order
    return path


def check_before_fetch(job: BuildJob, mergefile: Mergefile, spec: MergeSpec,
                       states: dict[str, NodeState], store: Store) -> None:
    """Check the parents fit from configs and headers alone: hub metadata comes from the
    cache or by range requests, local and built parents' headers from disk."""
    from mergebuild.build.compat import check_compatibility
    from mergebuild.build.vocab import harmonize_metadata

    metadata = parent_metadata(mergefile, spec, states, store)
    check_compatibility(job, harmonize_metadata(job, metadata))


def parent_metadata(mergefile: Mergefile, spec: MergeSpec, states: dict[str, NodeState],
                    store: Store) -> dict[str, ModelMetadata]:
    """Each parent's config and tensor table (no tensor data read): a hub parent's from the
    cache or by range requests, a local, generated or built parent's from its directory."""
    from mergebuild.build.compat import ModelMetadata, directory_metadata
    from mergebuild.sources.hub import read_metadata

    metadata = {}
    for ref in dict.fromkeys(spec.parent_refs()):
        parent = states[ref]
        try:
            if parent.source is not None and parent.source.kind == "hub":
                config, tensors = read_metadata(parent.source.extra["resolution"], node=ref)
                metadata[ref] = ModelMetadata(config=config, tensors=tensors)
            elif parent.source is not None:
                metadata[ref] = directory_metadata(materialize(parent.source, store))
            elif parent.kind == "adapted":
                metadata[ref] = directory_metadata(adapted_model_dir(mergefile, ref, states))
            else:
                assert parent.path is not None
                metadata[ref] = directory_metadata(parent.path)
        except CheckpointError as exc:
            exc.node = exc.node or ref  # name the parent whose weights are unusable
            raise
    return metadata


def with_parents(job: BuildJob, mergefile: Mergefile, spec: MergeSpec,
                 states: dict[str, NodeState], store: Store,
                 download: Callable[[str, str, int, int], None]) -> BuildJob:
    """``job`` with every parent's directory (sources downloaded or generated here,
    ``download(node, label, done, total)`` told of each file) and the LoRA adapters read
    over them."""
    parent_dirs: dict[str, Path] = {}
    adapters = {}
    for ref in spec.parent_refs():
        parent = states[ref]
        if parent.kind == "adapted":  # the merge's build, its LoRA applied while streaming
            assert parent.adapter is not None
            parent_dirs[ref] = adapted_model_dir(mergefile, ref, states)
            adapters[ref] = fetch_adapter(parent.adapter)
        elif parent.kind == "source":
            assert parent.source is not None
            parent_dirs[ref] = materialize(
                parent.source, store,
                progress=lambda label, done, total, ref=ref: download(ref, label, done, total))
        else:
            assert parent.path is not None
            parent_dirs[ref] = parent.path
    for ref in parent_dirs:
        source = states[ref].source
        adapter = adapter_directory(source) if source is not None else None
        if adapter is not None:  # resolved once: a hub adapter is fetched here
            adapters[ref] = adapter
    return replace(job, parents=parent_dirs, adapters=adapters)
