"""The output's config.json: the donor's, adjusted for a layer stack, an untied head and dtype."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Lists that hold layer indices rather than one entry per layer: renumbered, not sliced.
_LAYER_INDEX_LISTS = ("mlp_only_layers",)
# Lists that can be as long as the layer count without being indexed by layer (a 2-layer test
# model with two end-of-sequence tokens).
_NOT_PER_LAYER = ("architectures", "eos_token_id", "bad_words_ids", "suppress_tokens",
                  "begin_suppress_tokens")


@dataclass(frozen=True)
class StackedRange:
    """Layers ``[start, end)`` of the model whose config is ``config``, stacked in order."""

    config: Mapping[str, Any]
    start: int
    end: int


def output_config(
    donor: Mapping[str, Any],
    *,
    stack: Sequence[StackedRange] | None = None,
    untie_head: bool = False,
    out_dtype: str | None = None,
) -> dict[str, Any]:
    """The donor's config with the layer count and per-layer lists of ``stack`` (a layer
    stack's ranges, in output order), ``tie_word_embeddings: false`` when ``untie_head`` (the
    output stores its own head) and the output dtype.

    Per-layer lists are every list as long as the donor's layer count (``layer_types`` of
    qwen2/qwen3/gemma2/gemma3, …): each range contributes its own model's entries for the
    layers it stacks, so a stack of sliding- and full-attention layers keeps each layer's kind.
    Lists of layer indices (``mlp_only_layers``) are renumbered to the output layers.
    """
    config = dict(donor)
    if stack is not None:
        config = _restack(config, stack)
    if untie_head:
        config["tie_word_embeddings"] = False
        text = config.get("text_config")
        if isinstance(text, Mapping) and "tie_word_embeddings" in text:
            config["text_config"] = {**text, "tie_word_embeddings": False}
    if out_dtype:
        config["torch_dtype"] = out_dtype
        if "dtype" in config:
            config["dtype"] = out_dtype
    return config


def _layer_count(config: Mapping[str, Any]) -> int | None:
    for key in LAYER_COUNT_KEYS:
        n = config.get(key)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def _restack(config: dict[str, Any], stack: Sequence[StackedRange]) -> dict[str, Any]:
    total = sum(r.end - r.start for r in stack)
    n = _layer_count(config)
    for key in LAYER_COUNT_KEYS:
        if key in config:
            config[key] = total
    if n is None:
        return config
    for key, value in list(config.items()):
        if not isinstance(value, list) or key in _NOT_PER_LAYER:
            continue
        if key in _LAYER_INDEX_LISTS:
            config[key] = _renumbered(key, value, stack)
        elif len(value) == n:
            config[key] = [entry for r in stack for entry in _per_layer(key, value, r)]
    return config


def _per_layer(key: str, donor_value: list, r: StackedRange) -> list:
    """The entries of layers ``[start, end)`` from the range's own model (the donor's list
    when that model has no list of its own length)."""
    own = r.config.get(key)
    own_n = _layer_count(r.config)
    values = own if isinstance(own, list) and own_n is not None and len(own) == own_n else donor_value
    return values[r.start:r.end]


def _renumbered(key: str, donor_value: list, stack: Sequence[StackedRange]) -> list[int]:
    out: list[int] = []
    layer = 0
    for r in stack:
        own = r.config.get(key)
        indices = set(own if isinstance(own, list) else donor_value)
        for source_layer in range(r.start, r.end):
            if source_layer in indices:
                out.append(layer)
            layer += 1
    return out


__all__ = ["LAYER_COUNT_KEYS", "StackedRange", "output_config"]
