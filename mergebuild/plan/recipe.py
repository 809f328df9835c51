"""The canonical recipe of a merge node (what its key hashes) and the reasons two recipes differ."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mergebuild import ENGINE_VERSION
from mergebuild.methods.registry import REQUIRED, Method
from mergebuild.spec.model import Defaults, MergeSpec
from mergebuild.spec.validate import participants


def _param_defaults(method: Method, scope: str) -> dict[str, Any]:
    return {p.name: p.default for p in method.params if p.scope == scope and not p.required}


def _is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _layered(values: list[Any]) -> Any:
    """One parameter's settings from the highest-precedence scope down, as one value.

    mergekit resolves each scope in turn and falls through to the next when a scope's
    ``{filter, value}`` list matches nothing; a filter list without a catch-all entry gets
    the lower scopes' settings appended as entries, which resolves the same way.
    """
    out = values[0]
    for lower in values[1:]:
        if not _is_filter_list(out) or any(e.get("filter") in (None, "*") for e in out):
            break
        out = [*out, *(lower if _is_filter_list(lower) else [{"value": lower}])]
    return out


def parent_parameters(
    method: Method, spec: MergeSpec, entry_params: Mapping[str, Any],
    slice_params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-parent parameters after mergekit's precedence: the entry, the slice, the node, the
    default (parameters this method ignores are left out)."""
    out: dict[str, Any] = {}
    scopes = [entry_params, slice_params or {}, spec.parameters]
    for p in method.params:
        if p.scope != "parent":
            continue
        found = [scope[p.name] for scope in scopes if p.name in scope]
        if found:
            out[p.name] = _layered(found)
        elif p.default is not REQUIRED:
            out[p.name] = p.default
    return out


def global_parameters(method: Method, spec: MergeSpec,
                      slice_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Node-wide parameters: the slice's, else the node's, else the default."""
    out = _param_defaults(method, "global")
    for p in method.params:
        if p.scope != "global":
            continue
        found = [scope[p.name] for scope in (slice_params or {}, spec.parameters)
                 if p.name in scope]
        if found:
            out[p.name] = _layered(found)
    return out


def donor(spec: MergeSpec) -> str:
    """The node whose config and tokenizer the output takes: explicit, else base, else first."""
    first = spec.models[0].ref if spec.models else spec.slices[0].sources[0].ref  # type: ignore[index]
    if spec.tokenizer_source and spec.tokenizer_source not in ("base", "union"):
        return spec.tokenizer_source
    return spec.base or first


def build_recipe(
    spec: MergeSpec,
    method: Method,
    digest_of: Callable[[str], str],
    defaults: Defaults,
) -> dict[str, Any]:
    """The canonical recipe: method, parameters after defaults, parents by digest, output
    dtype, engine version. Node names, comments, key order and descriptions are not in it.
    """
    recipe: dict[str, Any] = {
        "engine": ENGINE_VERSION,
        "method": method.name,
        "parameters": global_parameters(method, spec),
        "dtype": spec.dtype or defaults.dtype,
        "donor": digest_of(donor(spec)),
        "shard_size": defaults.max_shard_size,
    }
    if spec.base is not None:
        recipe["base"] = digest_of(spec.base)
    if spec.slices is not None:
        recipe["slices"] = [
            [
                {
                    "model": digest_of(src.ref),
                    "layer_range": list(src.layer_range),
                    "parameters": parent_parameters(method, spec, src.parameters,
                                                    s.parameters),
                }
                for src in s.sources
            ]
            for s in spec.slices
        ]
        # Only when written, so that plain stacks keep the keys they always had.
        if any(s.base for s in spec.slices):
            recipe["slice_bases"] = [digest_of(s.base) if s.base else None
                                     for s in spec.slices]
        if any(s.parameters for s in spec.slices):
            recipe["slice_parameters"] = [global_parameters(method, spec, s.parameters)
                                          for s in spec.slices]
    else:
        recipe["models"] = [
            {"model": digest_of(ref), "parameters": parent_parameters(method, spec, params)}
            for ref, params in participants(spec, method)
        ]
    if spec.chat_template is not None:
        recipe["chat_template"] = spec.chat_template
    if spec.tokenizer is not None:
        # The policy changes embedding rows; which model donates is in "donor" already.
        recipe["tokenizer"] = {
            "source": spec.tokenizer.policy,
            "pad_to_multiple_of": spec.tokenizer.pad_to_multiple_of,
        }
        if spec.tokenizer.tokens:
            recipe["tokenizer"]["tokens"] = [t.recipe(digest_of) for t in spec.tokenizer.tokens]
    return recipe


def parent_names(spec: MergeSpec, method: Method) -> dict[str, Any]:
    """The node names aligned with the digests of :func:`build_recipe`, for reasons."""
    names: dict[str, Any] = {"donor": donor(spec), "base": spec.base}
    if spec.slices is not None:
        names["slices"] = [[src.ref for src in s.sources] for s in spec.slices]
    else:
        names["models"] = [ref for ref, _ in participants(spec, method)]
    return names


def _fmt(value: Any) -> str:
    return "unset" if value is None else str(value)


def recipe_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], new_names: Mapping[str, Any]
) -> list[str]:
    """Why ``new`` differs from ``old``, as short human-readable reasons."""
    reasons: list[str] = []
    if old.get("engine") != new.get("engine"):
        reasons.append(f"engine changed ({_fmt(old.get('engine'))} → {new.get('engine')})")
    if old.get("method") != new.get("method"):
        reasons.append(f"method changed ({_fmt(old.get('method'))} → {new.get('method')})")
    old_p, new_p = old.get("parameters", {}), new.get("parameters", {})
    for name in sorted(set(old_p) | set(new_p)):
        if old_p.get(name) != new_p.get(name):
            reasons.append(
                f"parameter changed: {name} {_fmt(old_p.get(name))} → {_fmt(new_p.get(name))}"
            )
    for field, label in (("dtype", "dtype"), ("shard_size", "shard size"),
                         ("chat_template", "chat template")):
        if old.get(field) != new.get(field):
            reasons.append(f"{label} changed ({_fmt(old.get(field))} → {_fmt(new.get(field))})")
    changed_parents: list[str] = []
    if old.get("base") != new.get("base"):
        changed_parents.append(_fmt(new_names.get("base")))
    if old.get("donor") != new.get("donor") and new_names.get("donor") not in changed_parents:
        changed_parents.append(_fmt(new_names.get("donor")))
    for kind in ("models", "slices"):
        old_list, new_list = old.get(kind), new.get(kind)
        if old_list is None and new_list is None:
            continue
        if old_list is None or new_list is None or len(old_list) != len(new_list):
            reasons.append(f"{kind} list changed")
            continue
        names = new_names.get(kind) or []
        for i, (a, b) in enumerate(zip(old_list, new_list, strict=True)):
            pairs = zip(a, b, strict=False) if kind == "slices" else [(a, b)]
            entry_names = names[i] if kind == "slices" else [names[i]]
            if kind == "slices" and len(a) != len(b):
                reasons.append(f"slice {i} changed")
                continue
            for j, (x, y) in enumerate(pairs):
                who = entry_names[j] if j < len(entry_names) else f"#{i}"
                if x.get("model") != y.get("model") and who not in changed_parents:
                    changed_parents.append(who)
                for name in sorted(set(x.get("parameters", {})) | set(y.get("parameters", {}))):
                    va, vb = x["parameters"].get(name), y["parameters"].get(name)
                    if va != vb:
                        reasons.append(
                            f"parameter changed: {name} of {who} {_fmt(va)} → {_fmt(vb)}"
                        )
                if x.get("layer_range") != y.get("layer_range"):
                    reasons.append(
                        f"layer_range of {who} changed ({x.get('layer_range')} → "
                        f"{y.get('layer_range')})"
                    )
    reasons.extend(f"parent changed: {name}" for name in changed_parents)
    if not reasons:
        reasons.append("recipe changed")
    return reasons
