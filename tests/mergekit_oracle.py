"""Test support for merge methods: resolved parameters, and mergekit 0.1.5 as a reference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch

from mergebuild.methods.registry import METHODS, TensorParams

TENSOR_NAME = "model.layers.0.mlp.up_proj.weight"


def method_params(
    method: str, parents: tuple[Mapping[str, Any], ...] = (), **globals_: Any
) -> TensorParams:
    """TensorParams with the registry's defaults for every global parameter not given."""
    values = {
        p.name: p.default for p in METHODS[method].params if p.scope == "global" and not p.required
    }
    values.update(globals_)
    return TensorParams(TENSOR_NAME, values, tuple(parents))


def merge(
    method: str,
    parents: list[torch.Tensor],
    base: torch.Tensor | None = None,
    parent_params: tuple[Mapping[str, Any], ...] = (),
    generator: torch.Generator | None = None,
    **globals_: Any,
) -> torch.Tensor:
    """Run a registered method on copies of the inputs (methods may modify them)."""
    if not parent_params:
        parent_params = tuple({} for _ in parents)
    params = method_params(method, parent_params, **globals_)
    return METHODS[method].load()(
        [p.clone() for p in parents],
        None if base is None else base.clone(),
        params,
        generator,
    )


def mergekit_method(name: str) -> Any:
    registry = pytest.importorskip(
        "mergekit.merge_methods.registry",
        reason="mergekit is not importable: compatibility with it is not checked",
    )
    return registry.get(name)


def mergekit_merge(
    name: str,
    parents: list[torch.Tensor],
    base: torch.Tensor | None = None,
    per_parent: Mapping[str, list[Any]] | None = None,
    **shared: Any,
) -> torch.Tensor:
    """mergekit's own per-tensor computation for the same inputs."""
    method = mergekit_method(name)  # skips the test when mergekit is absent
    from mergekit.merge_methods.base import PerInputValues, TensorGroup

    tensors = [p.clone() for p in parents]
    base_index = None
    if base is not None:
        tensors.append(base.clone())
        base_index = len(tensors) - 1
    group = TensorGroup.from_tensors(tensors, base_index=base_index, name=TENSOR_NAME)
    kwargs = dict(shared)
    for key, values in (per_parent or {}).items():
        kwargs[key] = PerInputValues(list(enumerate(values)))
    return method.merge_group(group, **kwargs)


# mergekit parameters that only save memory and never change a result: not in the registry
# (a Mergefile may write them; they are accepted with a warning and left out of the recipe).
NOT_ACCEPTED = {"int8_mask"}


def assert_registry_matches_mergekit(name: str) -> None:
    """Same parameter names, defaults, requiredness, scope and base policy as mergekit."""
    theirs = mergekit_method(name).spec  # skips the test when mergekit is absent
    from mergekit.merge_methods.base import MISSING, ParameterScope

    ours = METHODS[name]
    their_params = [p for p in theirs.parameters if p.name not in NOT_ACCEPTED]
    assert {p.name for p in ours.params} == {p.name for p in their_params}
    for spec in their_params:
        param = ours.param(spec.name)
        assert param is not None
        if spec.default is MISSING:
            assert param.required, spec.name
        else:
            assert param.default == spec.default, spec.name
        expected_scope = "global" if spec.scope == ParameterScope.SHARED else "parent"
        assert param.scope == expected_scope, spec.name
    expected_base = {"optional": "optional", "required": "required", "ignored": "none"}
    assert ours.base == expected_base[theirs.contract.base.value]
