"""Sweeps: a merge node's grid of values expanded into variant nodes with readable names."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

from mergebuild.errors import MergefileError
from mergebuild.spec.model import MergeSpec, ParentSpec, SelectSpec
from mergebuild.spec.validate import SELECT_KEYS, did_you_mean
from mergebuild.spec.yaml_lines import LineDict, plain

_PREFIX_PARAMETERS = "parameters."
_PREFIX_MODELS = "models."


def grid_points(grid: Mapping[str, Any], file: str, line: int, node: str
                ) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first path varying slowest.

    Example:
        >>> grid_points({"t": [0.2, 0.5], "models.code.weight": [1.0]}, "Mergefile", 1, "b")
        [{'t': 0.2, 'models.code.weight': 1.0}, {'t': 0.5, 'models.code.weight': 1.0}]
    """
    if not isinstance(grid, Mapping) or not grid:
        raise MergefileError("'sweep' must map parameter paths to lists of values",
                             file=file, line=line, node=node,
                             hint="sweep: {t: [0.2, 0.5, 0.8], models.code.weight: [0.5, 1.0]}")
    axes = []
    for path, values in grid.items():
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float, str, bool)) for v in values):
            raise MergefileError(f"sweep '{path}' must be a non-empty list of values",
                                 file=file, line=line, node=node,
                                 hint=f"{path}: [0.2, 0.5, 0.8]")
        axes.append([(path, v) for v in values])
    return [dict(combination) for combination in itertools.product(*axes)]


def _label(path: str) -> str:
    """A path as it appears in a variant's name: ``models.code.weight`` → ``code.weight``."""
    for prefix in (_PREFIX_PARAMETERS, _PREFIX_MODELS):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def variant_name(node: str, point: Mapping[str, Any]) -> str:
    """``blend[t=0.35,code.weight=1.0]``: the node and its swept values, in grid order."""
    return f"{node}[{','.join(f'{_label(p)}={format_value(v)}' for p, v in point.items())}]"


def apply_point(spec: MergeSpec, point: Mapping[str, Any], file: str, line: int) -> MergeSpec:
    """``spec`` with the point's values set: ``t`` (or ``parameters.t``) in the node's
    parameters, ``models.REF.PARAM`` in the parameters of the models entry of ``REF``."""
    parameters = dict(spec.parameters)
    models = list(spec.models)
    refs = [m.ref for m in models]
    for path, value in point.items():
        if path.startswith(_PREFIX_MODELS):
            ref, _, param = path[len(_PREFIX_MODELS):].rpartition(".")
            if ref not in refs or not param:
                hint = did_you_mean(ref, refs) or (
                    f"write models.MODEL.PARAMETER with MODEL one of {', '.join(refs)}"
                    if refs else "this merge has no models list to sweep over")
                raise MergefileError(f"sweep path '{path}' names no model of this merge",
                                     file=file, line=line, node=spec.name, hint=hint)
            index = refs.index(ref)
            entry = models[index]
            models[index] = ParentSpec(ref=entry.ref, parameters={**entry.parameters,
                                                                  param: value},
                                       line=entry.line)
        else:
            name = path[len(_PREFIX_PARAMETERS):] if path.startswith(_PREFIX_PARAMETERS) else path
            if not name or "." in name:
                raise MergefileError(
                    f"sweep path '{path}' is neither a parameter nor models.MODEL.PARAMETER",
                    file=file, line=line, node=spec.name,
                    hint="sweep a node parameter (t) or a model's (models.code.weight)")
            parameters[name] = value
    return replace(spec, name=variant_name(spec.name, point), parameters=parameters,
                   models=tuple(models), written=written_at(spec.written, point))


# What makes a merge a sweep or a search, and which variant it stands for: a variant is written
# without them (its provenance's Mergefile excerpt rebuilds that one merge, not the grid).
_GROUP_KEYS = ("sweep", "search", "select")


def written_at(written: Mapping[str, Any], point: Mapping[str, Any]) -> Mapping[str, Any]:
    """A merge node as written (``sweep:``/``search:``/``select:`` dropped) with ``point``'s
    values set where a user would write them: ``t`` in ``parameters``, ``models.REF.PARAM``
    in the parameters of the models entry of ``REF``. Line numbers are kept."""
    body = {k: v for k, v in plain(written).items() if k not in _GROUP_KEYS}
    for path, value in point.items():
        if path.startswith(_PREFIX_MODELS):
            ref, _, param = path.removeprefix(_PREFIX_MODELS).rpartition(".")
            entries = []
            for entry in body.get("models") or []:
                if isinstance(entry, str):
                    entry = {"model": entry}
                if str(entry.get("model", "")).strip() == ref:
                    entry = {**entry, "parameters": {**(entry.get("parameters") or {}),
                                                     param: value}}
                entries.append(entry)
            body["models"] = entries
        else:
            name = path.removeprefix(_PREFIX_PARAMETERS)
            body["parameters"] = {**(body.get("parameters") or {}), name: value}
    out = LineDict(body)
    out.line = getattr(written, "line", 0)
    out.key_lines = dict(getattr(written, "key_lines", {}))
    out.key_texts = dict(getattr(written, "key_texts", {}))
    return out


RETENTION = "retention"


def parse_select(value: Any, file: str, line: int, node: str) -> SelectSpec:
    """``{maximize: METRIC}`` or ``{minimize: METRIC}`` (``retention`` is a metric too)."""
    if (not isinstance(value, Mapping) or len(value) != 1
            or next(iter(value)) not in SELECT_KEYS
            or not isinstance(next(iter(value.values())), str)):
        raise MergefileError("'select' must be {maximize: METRIC} or {minimize: METRIC}",
                             file=file, line=line, node=node,
                             hint="select: {maximize: code-skill} or {maximize: retention}")
    goal, metric = next(iter(value.items()))
    if metric == RETENTION and goal != "maximize":
        raise MergefileError("'select' can only maximize retention (1.0 keeps every "
                             "ancestor's score)", file=file, line=line, node=node,
                             hint="select: {maximize: retention}")
    return SelectSpec(goal=goal, metric=metric)


def split_select_metric(metric: str, evals: Collection[str]) -> tuple[str, str | None] | None:
    """``EVAL`` → (EVAL, None: its one score); ``EVAL.METRIC`` → (EVAL, METRIC); None when
    ``metric`` names no eval of ``evals`` (an eval's own name wins over a dotted split).

    Example:
        >>> split_select_metric("harness.acc", ["harness", "code-skill"])
        ('harness', 'acc')
    """
    if metric in evals:
        return metric, None
    head, dot, tail = metric.rpartition(".")
    if dot and head in evals and tail:
        return head, tail
    return None
