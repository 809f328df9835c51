"""Can these parents be merged? Checked on configs and tensor headers alone, before any bytes.

The same check runs twice: before anything is downloaded (on hub metadata read by range
requests or from the cache, and on local safetensors headers) and inside the engine on the
opened checkpoints. Neither imports torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mergebuild.errors import IncompatibleModelsError, MergefileError
from mergebuild.build.parameters import layer_index, layer_stack
from mergebuild.spec.validate import arithmetic_base

TensorShapes = Mapping[str, tuple[str, tuple[int, ...]]]  # name → (safetensors dtype, shape)

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_VOCAB_HINTS = ("embed", "lm_head", "wte", "output.weight")
_SAME_ARCH_HINT = "merge only fine-tunes of the same base architecture"
_SAME_VOCAB_HINT = ("set tokenizer_source: base (or union) to match embedding rows by token, "
                    "or merge models that share a tokenizer")
# Output heads that a tied model leaves out (it reuses the input embedding for them).
HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
_EMBED_HINTS = ("embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings")
# Non-persistent buffers some exports include and others do not; never merged arithmetic.
_OPTIONAL_SUFFIXES = ("rotary_emb.inv_freq", "position_ids", ".attn.bias", ".attn.masked_bias")


@dataclass(frozen=True)
class ModelMetadata:
    """What the compatibility check needs of one parent: its config and its tensor table."""

    config: Mapping[str, Any] = field(default_factory=dict)
    tensors: TensorShapes = field(default_factory=dict)


class _Method(Protocol):
    base: str  # "none" | "optional" | "required"
    name: str


class _Participant(Protocol):
    node: str


class MergeShape(Protocol):
    """The parts of a build job the check reads (``engine.BuildJob`` is one)."""

    node: str
    method: _Method
    base: str | None
    donor: str
    participants: Sequence[_Participant]
    slices: Sequence[Any] | None
    # Optional: with a tokenizer_source, embedding rows are matched by token, so parents may
    # differ in vocabulary size (read with getattr; plain test doubles may omit it).
    # tokenizer_source: str | None


def reader_metadata(reader: Any) -> ModelMetadata:
    """The metadata of an open ``checkpoint.CheckpointReader`` (headers already parsed)."""
    return ModelMetadata(
        config=reader.config or {},
        tensors={name: (info.dtype, tuple(info.shape)) for name, info in reader.tensors.items()},
    )


def directory_metadata(directory: Path) -> ModelMetadata:
    """Config and safetensors headers of a model directory; no tensor data is read."""
    from mergebuild.io.checkpoint import CheckpointReader

    reader = CheckpointReader(directory)
    try:
        return reader_metadata(reader)
    finally:
        reader.close()


def layer_count(meta: ModelMetadata) -> int:
    """Decoder layers: from the config when it says, else from the tensor names."""
    for key in _LAYER_KEYS:
        n = meta.config.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    present = [i for i in (layer_index(t) for t in meta.tensors) if i is not None]
    return max(present) + 1 if present else 0


def architecture(meta: ModelMetadata) -> str | None:
    """The model family (``model_type``), else the first declared architecture class."""
    model_type = meta.config.get("model_type")
    if isinstance(model_type, str) and model_type:
        return model_type
    archs = meta.config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return None


def vocab_size(meta: ModelMetadata) -> int | None:
    """``vocab_size`` from the config (or its text sub-config), else the embedding rows."""
    for config in (meta.config, meta.config.get("text_config")):
        if isinstance(config, Mapping):
            n = config.get("vocab_size")
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
    for name, (_, shape) in sorted(meta.tensors.items()):
        if "embed" in name and shape:
            return shape[0]
    return None


def embedding_name(meta: ModelMetadata) -> str | None:
    """The input embedding matrix (token rows), outside the decoder layers; None if absent."""
    for name, (_, shape) in sorted(meta.tensors.items()):
        if len(shape) == 2 and layer_index(name) is None and any(h in name for h in _EMBED_HINTS):
            return name
    return None


def head_name(meta: ModelMetadata) -> str | None:
    """The output head tensor of a model that stores its own, else None (tied or headless)."""
    return next((name for name in HEAD_NAMES if name in meta.tensors), None)


def output_layout(donor: ModelMetadata, parents: Iterable[ModelMetadata]) -> ModelMetadata:
    """The tensor layout and config the output takes: the donor's, except where the donor is
    tied and a parent has an untied output head of its own.

    Then, as mergekit does, the head is merged too (a tied parent's embedding stands in for
    its head) and the output is untied: the layout gains the head, shaped like the donor's
    embedding, and its config says ``tie_word_embeddings: false``. Keeping the donor's tie
    would silently drop the untied parents' heads.
    """
    embed = embedding_name(donor)
    if head_name(donor) is not None or embed is None:
        return donor
    for parent in parents:
        head = head_name(parent)
        if head is not None and parent.config.get("tie_word_embeddings") is not True:
            return ModelMetadata(
                config={**donor.config, "tie_word_embeddings": False},
                tensors={**donor.tensors, head: (donor.tensors[embed][0], donor.tensors[embed][1])},
            )
    return donor


def tensor_sources(ref: ModelMetadata, other: ModelMetadata) -> dict[str, str | None]:
    """For each tensor of ``ref`` (the donor, whose layout the output takes), the tensor of
    ``other`` that supplies it, or None when ``other`` lacks it.

    Tied embeddings: where the donor has an output head (``lm_head.weight``) and ``other``
    does not but has an embedding matrix, ``other`` is tied (its config says
    ``tie_word_embeddings: true`` or is silent), so its embedding supplies the head. Where the
    donor is tied, the output follows the donor's config and has no head: a parent's own
    ``lm_head.weight`` is not part of the output (see :func:`ignored_extras`).
    """
    out: dict[str, str | None] = {}
    embed = embedding_name(other)
    tied = other.config.get("tie_word_embeddings") is not False
    for name in ref.tensors:
        if name in other.tensors:
            out[name] = name
        elif name in HEAD_NAMES and embed is not None and tied:
            out[name] = embed
        else:
            out[name] = None
    return out


def ignored_extras(ref: ModelMetadata, other: ModelMetadata) -> tuple[list[str], list[str]]:
    """Tensors of ``other`` the donor ``ref`` lacks: (ignored optional ones, the rest).

    Optional: buffers such as ``rotary_emb.inv_freq``, and an output head when the donor is
    tied (the output follows the donor's config, which reuses the embedding).
    """
    extras = sorted(set(other.tensors) - set(ref.tensors))
    donor_tied = embedding_name(ref) is not None and not any(h in ref.tensors for h in HEAD_NAMES)
    optional = [n for n in extras if n.endswith(_OPTIONAL_SUFFIXES)
                or (donor_tied and n in HEAD_NAMES)]
    return optional, [n for n in extras if n not in optional]


def involved_parents(job: MergeShape) -> list[str]:
    """The parents whose tensors enter the arithmetic: the base (if used) and the models."""
    base = arithmetic_base(job.base, job.method)
    involved = [base] if base else []
    involved += [p.node for p in job.participants]
    return list(dict.fromkeys(involved))


def check_compatibility(job: MergeShape, metadata: Mapping[str, ModelMetadata]) -> None:
    """Raise one-line ``IncompatibleModelsError`` naming the node if the parents cannot merge.

    Checks, in the order a user can act on them: the method's base is present, every parent
    is the same architecture family, has the same number of layers and the same vocabulary
    size, and the same tensor names and shapes. Tensor names are compared against the donor's
    layout (:func:`tensor_sources`): a tied parent supplies its embedding for the donor's
    ``lm_head.weight``, and optional extras the donor lacks (buffers such as
    ``rotary_emb.inv_freq``, a head when the donor is tied) are ignored; any other missing or
    extra tensor is an error naming it. Layer-stacking (slices) only needs every
    ``layer_range`` to exist in its parent.

    Args:
        job: the merge to check (``engine.BuildJob`` or anything with the same fields).
        metadata: each parent's :class:`ModelMetadata`, by node name.
    """
    if job.method.base == "required" and not job.base and job.slices is None:
        raise MergefileError(f"{job.method.name} needs a base_model", node=job.node,
                             hint="add 'base_model: <node>'")
    if job.slices is not None:
        _check_slices(job, metadata)
        return
    ref_name = job.donor
    ref = output_layout(metadata[ref_name], [metadata[n] for n in involved_parents(job)])
    same_vocab = getattr(job, "tokenizer_source", None) is None
    for other_name in involved_parents(job):
        if other_name != ref_name:
            _check_pair(job.node, ref_name, ref, other_name, metadata[other_name], same_vocab)


def _check_pair(node: str, ref_name: str, ref: ModelMetadata, other_name: str,
                other: ModelMetadata, same_vocab: bool = True) -> None:
    if ref is other:
        return
    a, b = architecture(ref), architecture(other)
    if a and b and a != b:
        raise IncompatibleModelsError(
            f"architecture mismatch: '{ref_name}' is {a}, '{other_name}' is {b}", node=node,
            hint=_SAME_ARCH_HINT,
        )
    a_layers, b_layers = layer_count(ref), layer_count(other)
    if a_layers != b_layers:
        raise IncompatibleModelsError(
            f"layer count mismatch: '{ref_name}' has {a_layers} layers, "
            f"'{other_name}' has {b_layers}", node=node,
            hint="use a passthrough merge with slices to combine models of different depth",
        )
    a_vocab, b_vocab = vocab_size(ref), vocab_size(other)
    if same_vocab and a_vocab and b_vocab and a_vocab != b_vocab:
        raise IncompatibleModelsError(
            f"vocabulary mismatch: '{ref_name}' has {a_vocab} tokens, "
            f"'{other_name}' has {b_vocab}", node=node, hint=_SAME_VOCAB_HINT,
        )
    sources = tensor_sources(ref, other)
    missing = sorted(n for n, src in sources.items() if src is None)
    extra = ignored_extras(ref, other)[1]
    if missing or extra:
        what = (f"'{other_name}' lacks tensor {missing[0]}" if missing
                else f"'{other_name}' has tensor {extra[0]} that '{ref_name}' lacks")
        raise IncompatibleModelsError(
            f"parents do not have the same tensors: {what} ({len(missing) + len(extra)} differ)",
            node=node, hint=_SAME_ARCH_HINT,
        )
    for name, (_, shape) in ref.tensors.items():
        o_shape = other.tensors[sources[name]][1]  # type: ignore[index]
        if o_shape == shape:
            continue
        if any(h in name for h in _VOCAB_HINTS) and shape[1:] == o_shape[1:]:
            if not same_vocab:
                continue  # rows are matched by token (tokenizer_source)
            raise IncompatibleModelsError(
                f"vocabulary mismatch: '{ref_name}' has {shape[0]} tokens, "
                f"'{other_name}' has {o_shape[0]} ({name})", node=node, hint=_SAME_VOCAB_HINT,
            )
        raise IncompatibleModelsError(
            f"shape mismatch at {name}: '{ref_name}' {list(shape)} vs "
            f"'{other_name}' {list(o_shape)}", node=node, hint=_SAME_ARCH_HINT,
        )


def layer_stacks(meta: ModelMetadata) -> list[str]:
    """The prefixes of the model's numbered layer stacks: one for a decoder, more for a
    multi-module model (a VLM's ``model.language_model.layers`` and its vision tower's)."""
    return sorted({stack for stack in map(layer_stack, meta.tensors) if stack is not None})


def _check_slices(job: MergeShape, metadata: Mapping[str, ModelMetadata]) -> None:
    assert job.slices is not None
    families = {}
    for s in job.slices:
        for node, (start, end), _ in s.sources:
            meta = metadata[node]
            stacks = layer_stacks(meta)
            if len(stacks) > 1:
                # A layer_range would cut every stack at once (vision blocks included).
                raise IncompatibleModelsError(
                    f"'{node}' has {len(stacks)} layer stacks ({', '.join(stacks)}): a "
                    f"layer_range cannot say which one it slices", node=job.node,
                    hint="merge a multi-module model without slices, or slice each module "
                         "separately (mergekit's modules: syntax)",
                )
            n = layer_count(meta)
            if end > n:
                raise IncompatibleModelsError(
                    f"layer_range [{start}, {end}) is out of range: '{node}' has {n} layers",
                    node=job.node, hint=f"use an end of at most {n}",
                )
            family = architecture(meta)
            if family:
                families.setdefault(family, node)
    if len(families) > 1:
        (a, a_node), (b, b_node) = list(families.items())[:2]
        raise IncompatibleModelsError(
            f"architecture mismatch: '{a_node}' is {a}, '{b_node}' is {b}", node=job.node,
            hint=_SAME_ARCH_HINT,
        )


__all__ = ["HEAD_NAMES", "ModelMetadata", "architecture", "check_compatibility",
           "directory_metadata", "embedding_name", "head_name", "ignored_extras",
           "involved_parents", "layer_count", "layer_stacks", "output_layout", "reader_metadata",
           "tensor_sources", "vocab_size"]
