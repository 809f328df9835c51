"""Check what a Mergefile says against the method registry: keys, parameter kinds, ranges,
scopes and base requirements; every error names file, line and node, with a hint."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

from mergebuild.errors import MergefileError, shorten
from mergebuild.methods.registry import Method, Param
from mergebuild.spec.model import MergeSpec
from mergebuild.spec.yaml_lines import LineDict

TOP_LEVEL_KEYS = ("version", "defaults", "evals", "models", "card")
DEFAULT_KEYS = ("dtype", "device", "max_shard_size", "tokenizer_source")
SOURCE_KEYS = ("source", "description", "allow_pickle", "card", "evals")
MERGE_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "slices",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "description",
    "evals",
    "checks",
    "card",
    "sweep",
    "search",
    "select",
    "allow_nonfinite",
)
SELECT_KEYS = ("maximize", "minimize")
SEARCH_KEYS = ("sampler", "trials", "seed", "space")
PARENT_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")
SLICE_SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "pad_to_multiple_of", "tokens")
TOKEN_KEYS = ("source", "force")


# No merge parameter is meaningful beyond this magnitude; far below it, products with
# weights (|x| up to ~1e4 in real checkpoints) and sums over parents stay finite in float32.
PARAMETER_MAGNITUDE_LIMIT = 1e6


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def check_keys(
    mapping: LineDict, allowed: tuple[str, ...], what: str, file: str, node: str | None
) -> None:
    """Reject a key of ``mapping`` that is not in ``allowed``, suggesting the closest one."""
    for key in mapping:
        if key not in allowed:
            hint = did_you_mean(key, allowed) or f"allowed keys: {', '.join(allowed)}"
            raise MergefileError(
                f"unknown key '{key}' in {what}", file=file, line=mapping.line_of(key), node=node,
                hint=hint,
            )


# Every parameter name a mergekit 0.1.5 method takes (its merge_methods/registry.py): on a
# method that does not use it, mergekit ignores it silently; mergebuild accepts it with one
# warning and leaves it out of the recipe. A name no method knows stays an error.
MERGEKIT_PARAMETERS = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask",
    "t", "nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "eps", "max_iter", "tol",
    "filter_wise", "select_topk", "r", "alpha", "scale",
})
_WHY_IGNORED = {
    "int8_mask": "a memory hint in mergekit (int8 sign masks); mergebuild computes in float32 "
                 "and gets the same result either way",
}


def known_parameter_names() -> frozenset[str]:
    """Names some method (mergekit's or mergebuild's) takes."""
    from mergebuild.methods.registry import METHODS

    return MERGEKIT_PARAMETERS | {p.name for m in METHODS.values() for p in m.params}


def ignored_parameter(method: Method, name: str) -> bool:
    """Whether ``name`` is a parameter another method takes but ``method`` ignores."""
    return method.param(name) is None and name in known_parameter_names()


def _ignored_warning(method: Method, key: str, file: str, line: int, node: str) -> str:
    why = _WHY_IGNORED.get(key, "mergekit ignores it too")
    return (f"{file}:{line}: node '{node}': parameter '{key}' does nothing for {method.name} "
            f"({why}); accepted and left out of the recipe")


def validate_parameters(spec: MergeSpec, method: Method, file: str) -> list[str]:
    """Check parameter names, scopes, kinds and ranges against the method's schema, and the
    models each slice gives the method; return one warning line per ignored parameter."""
    names = [p.name for p in method.params]
    g_line = spec.line_of("parameters")
    warnings: list[str] = []

    def unknown(key: str, line: int, where: str) -> MergefileError:
        hint = did_you_mean(key, names) or did_you_mean(key, sorted(known_parameter_names())) or (
            f"{method.name} takes: {', '.join(names)}" if names else f"{method.name} takes none"
        )
        return MergefileError(f"unknown parameter '{key}' {where} for {method.name}", file=file,
                              line=line, node=spec.name, hint=hint)

    def known(key: str, kline: int, where: str) -> Param | None:
        """The method's parameter ``key``; None (after one warning line) for a name some
        method takes and this one ignores; an error for a name no method takes."""
        param = method.param(key)
        if param is None:
            if not ignored_parameter(method, key):
                raise unknown(key, kline, where)
            warnings.append(_ignored_warning(method, key, file, kline, spec.name))
        return param

    def node_wide(params: Mapping[str, Any], line: int, where: str) -> None:
        """A node's or slice's parameters: node-wide ones and per-model defaults."""
        for key, value in params.items():
            kline = params.line_of(key) if isinstance(params, LineDict) else line
            param = known(key, kline, where)
            if param is not None:
                _check_value(param, value, file, kline, spec.name)

    node_wide(spec.parameters, g_line, "in 'parameters'")
    for s in spec.slices or ():
        node_wide(s.parameters, s.line, "in a slice's 'parameters'")

    entries: list[tuple[Mapping[str, Any], int]] = [(p.parameters, p.line) for p in spec.models]
    for s in spec.slices or ():
        entries.extend((src.parameters, src.line) for src in s.sources)
    for params, line in entries:
        for key, value in params.items():
            kline = params.line_of(key) if isinstance(params, LineDict) else line
            param = known(key, kline, "in a models entry")
            if param is None:
                continue
            if param.scope != "parent":
                raise MergefileError(
                    f"'{key}' is a node-wide parameter of {method.name}", file=file, line=kline,
                    node=spec.name, hint="move it to the node's 'parameters:'",
                )
            _check_value(param, value, file, kline, spec.name)

    taking_part = participants(spec, method)
    base_line = spec.line_of("base_model")
    if method.base == "required" and spec.base is None and (
        spec.slices is None or any(s.base is None for s in spec.slices)
    ):
        raise MergefileError(f"{method.name} needs a base_model", file=file, line=spec.line,
                             node=spec.name, hint="add 'base_model: NODE'")
    if spec.slices is None:
        count = len(taking_part)
        _check_count(method, count, file, base_line if count == 0 else spec.models[0].line,
                     spec.name, "")
    else:
        for i, s in enumerate(spec.slices):
            _check_slice(spec, method, i, file)
    for param in method.params:
        if not param.required:
            continue
        if param.scope == "global" and param.name not in spec.parameters and (
            spec.slices is None or any(param.name not in s.parameters for s in spec.slices)
        ):
            raise MergefileError(f"{method.name} needs parameter '{param.name}'", file=file,
                                 line=g_line, node=spec.name,
                                 hint=f"add '{param.name}:' under 'parameters:'")
        if param.scope == "parent" and param.name not in spec.parameters:
            for entry in spec.models:
                if entry.ref == arithmetic_base(spec.base, method):
                    continue
                if param.name not in entry.parameters:
                    raise MergefileError(
                        f"model '{entry.ref}' needs parameter '{param.name}'", file=file,
                        line=entry.line, node=spec.name,
                        hint=f"add 'parameters: {{{param.name}: ...}}' to that models entry",
                    )
            for s in spec.slices or ():
                base = slice_base(spec, s, method)
                for src in s.sources:
                    if src.ref == base or param.name in s.parameters:
                        continue
                    if param.name not in src.parameters:
                        raise MergefileError(
                            f"slice source '{src.ref}' needs parameter '{param.name}'",
                            file=file, line=src.line, node=spec.name,
                            hint=f"add 'parameters: {{{param.name}: ...}}' to that source, "
                                 "the slice or the node",
                        )
    return warnings


def slice_base(spec: MergeSpec, s: Any, method: Method) -> str | None:
    """A slice's base as mergekit reads it: its own base_model, else the node's; a method
    that takes no base ignores it (it then merges every source)."""
    if method.base == "none":
        return None
    return s.base or spec.base


def _check_slice(spec: MergeSpec, method: Method, index: int, file: str) -> None:
    """One slice gives the method what it needs: its base among its sources, the right count."""
    s = spec.slices[index]  # type: ignore[index]
    base = slice_base(spec, s, method)
    refs = [src.ref for src in s.sources]
    if base is not None and base not in refs:
        raise MergefileError(
            f"slice {index + 1}: its base_model '{base}' is not one of its sources",
            file=file, line=s.line, node=spec.name,
            hint=f"add {{model: {base}, layer_range: [...]}} to the slice's sources "
                 "(the base's layers come from the slice too, as in mergekit)",
        )
    count = len(refs) - (1 if base is not None else 0)
    _check_count(method, count, file, s.line, spec.name, f"slice {index + 1}: ")


def _check_count(method: Method, count: int, file: str, line: int, node: str,
                 where: str) -> None:
    if count < method.min_parents or (method.max_parents and count > method.max_parents):
        expected = (
            f"exactly {method.min_parents}" if method.min_parents == method.max_parents
            else f"at least {method.min_parents}" if not method.max_parents
            else f"{method.min_parents} to {method.max_parents}"
        )
        extra = " besides the base_model" if method.base == "required" else ""
        noun = "model" if method.max_parents == 1 else "models"
        raise MergefileError(
            f"{where}{method.name} takes {expected} {noun}{extra}, got {count}", file=file,
            line=line, node=node,
            hint="check the slice's sources and base_model" if where
            else "check 'models:' and 'base_model:'",
        )


def arithmetic_base(base: str | None, method: Method) -> str | None:
    """The base model as the method uses it: None without one or for a base-free method."""
    return base if base and method.base != "none" else None


def participants(spec: MergeSpec, method: Method) -> list[tuple[str, Mapping[str, Any]]]:
    """(parent node, its raw parameters) for each listed model that takes part in the
    arithmetic besides the base, which is passed apart (see :func:`arithmetic_base`)."""
    base = arithmetic_base(spec.base, method)
    return [(p.ref, p.parameters) for p in spec.models if base is None or p.ref != base]


def _check_value(param: Param, value: Any, file: str, line: int, node: str) -> None:
    def fail(msg: str, hint: str | None = None) -> MergefileError:
        return MergefileError(f"parameter '{param.name}' {msg}", file=file, line=line, node=node,
                              hint=hint)

    if isinstance(value, list):
        if not param.varies:
            raise fail("does not vary by layer or tensor; give one value")
        if not value:
            raise fail("is an empty list")
        if all(isinstance(v, dict) for v in value):
            for entry in value:
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    raise fail("filter entries are {filter: SUBSTRING, value: VALUE}")
                if "filter" in entry and not isinstance(entry["filter"], str):
                    raise fail("'filter' must be a substring of tensor names")
                _check_value(param, entry["value"], file, line, node)
            return
        if param.kind in ("bool", "choice"):
            # Interpolating between true/false or between choices means nothing.
            raise fail(f"is a {param.kind} and takes no gradient",
                       "give one value, or a list of {filter: SUBSTRING, value: VALUE}")
        for v in value:
            if isinstance(v, (list, dict)):
                raise fail("gradients are flat lists of numbers")
            _check_scalar(param, v, fail)
        return
    if isinstance(value, dict):
        raise fail("must be a value, a list (gradient) or a list of {filter, value}")
    _check_scalar(param, value, fail)


def _check_scalar(param: Param, value: Any, fail) -> None:
    if param.kind == "bool":
        if not isinstance(value, bool):
            raise fail(f"must be true or false, got {shorten(value)}")
        return
    if param.kind == "choice":
        if value not in param.choices:
            raise fail(f"must be one of {', '.join(map(str, param.choices))}, got {shorten(value)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"must be a number, got {shorten(value)}")
    if param.kind == "int" and not float(value).is_integer():
        raise fail(f"must be a whole number, got {shorten(value)}")
    if math.isnan(value):
        raise fail("must not be NaN")
    if math.isinf(value):
        raise fail(f"must be finite, got {value!r}", "a merge of infinities is all NaN")
    if abs(value) > PARAMETER_MAGNITUDE_LIMIT:
        raise fail(f"must be between -{PARAMETER_MAGNITUDE_LIMIT:g} and "
                   f"{PARAMETER_MAGNITUDE_LIMIT:g}, got {value!r}",
                   "merges compute in float32 (largest value 3.4e38): a weight this large "
                   "overflows it once multiplied with the weights it scales")
    lo, hi = param.minimum, param.maximum
    if lo is not None and (value < lo or (param.min_exclusive and value == lo)):
        raise fail(f"must be {'>' if param.min_exclusive else '>='} {lo}, got {shorten(value)}")
    if hi is not None and (value > hi or (param.max_exclusive and value == hi)):
        raise fail(f"must be {'<' if param.max_exclusive else '<='} {hi}, got {shorten(value)}")
