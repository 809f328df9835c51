"""Resolve parameter values that vary by tensor (gradients, filters) to plain scalars."""

from __future__ import annotations

import re
from typing import Any

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block|decoder\.layers)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block a tensor belongs to, or None (embeddings, final norm, lm_head)."""
    m = _LAYER.search(tensor_name)
    return int(m.group(1)) if m else None


def layer_stack(tensor_name: str) -> str | None:
    """The layer stack a block's tensor belongs to (``model.layers``), or None outside one."""
    m = _LAYER.search(tensor_name)
    return tensor_name[: m.start(1) - 1].lstrip(".") if m else None


def replace_layer_index(tensor_name: str, new_index: int) -> str:
    m = _LAYER.search(tensor_name)
    if m is None:
        return tensor_name
    return tensor_name[: m.start(1)] + str(new_index) + tensor_name[m.end(1):]


def resolve_value(value: Any, tensor_name: str, layer: int | None, num_layers: int) -> Any:
    """One parameter's value for one tensor.

    Args:
        value: a scalar, a gradient list of numbers, or a list of ``{filter, value}``.
        tensor_name: the output tensor's name (filters are substring matches on it).
        layer: the tensor's layer index within the slice, or None outside the layers.
        num_layers: layers in the slice the gradient spans.
    Returns:
        A scalar, or None when no filter entry matched.
    Example:
        >>> resolve_value([0.0, 1.0], "model.layers.3.mlp.up_proj.weight", 3, 5)
        0.75
    """
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            for entry in value:
                flt = entry.get("filter")
                if flt is None or flt == "*" or flt in tensor_name:
                    return resolve_value(entry["value"], tensor_name, layer, num_layers)
            return None
        return _gradient(value, layer, num_layers)
    return value


def _gradient(values: list[Any], layer: int | None, num_layers: int) -> Any:
    if len(values) == 1:
        return values[0]
    # mergekit's quirk users rely on: tensors outside the layers take the first value.
    if layer is None:
        return values[0]
    pos = 1.0 if num_layers <= 1 else layer / (num_layers - 1)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(pos * (len(values) - 1))]  # booleans and choices are picked, not mixed
    x = pos * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    frac = x - i
    return values[i] * (1 - frac) + values[i + 1] * frac
