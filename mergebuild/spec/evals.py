"""Read a Mergefile's evaluations: the named ``evals:``, each node's ``evals:`` and ``checks:``."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from mergebuild.errors import EvaluationError, MergefileError
from mergebuild.evaluate.registry import KINDS, definition_from_params
from mergebuild.spec.model import Bound, Checks, EvalSpec
from mergebuild.spec.validate import did_you_mean
from mergebuild.spec.yaml_lines import LineDict, line_of

__all__ = ["DEMO_EVAL_DATA", "parse_checks", "parse_eval_definitions", "parse_node_evals"]

# ``data: demo://math.jsonl`` names the evaluation sets shipped with the demo family (the
# files sources/skills.py writes), so an example Mergefile works wherever mergebuild is
# installed. A path, not an import: spec/ ranks below sources/.
DEMO_EVAL_DATA = Path(__file__).resolve().parent.parent / "sources" / "skill_data"
BOUND_KEYS = ("min", "max", "metric")
EVAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_eval_definitions(raw: Any, file: str, line: int, base_dir: Path
                           ) -> dict[str, EvalSpec]:
    """The top-level ``evals:`` mapping, each entry ``NAME: {kind: KIND, ...parameters}``.

    Paths are relative to the Mergefile's folder (``demo://FILE``: a shipped demo eval set);
    a data file that does not exist is an error here, not when the evaluation runs.
    """
    if raw is None:
        return {}
    if not isinstance(raw, LineDict):
        raise MergefileError("'evals' must map eval names to {kind: ..., ...}", file=file,
                             line=line, hint="e.g. evals: {math: {kind: accuracy, data: m.jsonl}}")
    out = {}
    for name, body in raw.items():
        at = raw.line_of(name)
        if not isinstance(name, str) or not EVAL_NAME.match(name):
            raise MergefileError(f"invalid eval name {name!r}", file=file, line=at,
                                 hint="use letters, digits, '.', '_' and '-'")
        if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
            raise MergefileError(f"eval '{name}' needs 'kind:'", file=file, line=at,
                                 hint=f"one of {', '.join(KINDS)}")
        kind = body["kind"]
        if kind not in KINDS:
            raise MergefileError(f"eval '{name}': unknown kind '{kind}'", file=file, line=at,
                                 hint=did_you_mean(kind, list(KINDS))
                                 or f"one of {', '.join(KINDS)}")
        params = {k: _demo_path(v) for k, v in body.items() if k != "kind"}
        try:
            definition = definition_from_params(kind, params, base_dir)
        except EvaluationError as error:
            raise MergefileError(f"eval '{name}': {error.message}", file=file, line=at,
                                 hint=error.hint) from None
        for field, path in definition.data_files().items():
            if not path.exists():
                raise MergefileError(f"eval '{name}': {field} {path} does not exist", file=file,
                                     line=at, hint="paths are relative to the Mergefile")
        out[name] = EvalSpec(name=name, definition=definition, line=at)
    return out


def _demo_path(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("demo://"):
        return str(DEMO_EVAL_DATA / value[len("demo://"):])
    return value


def parse_node_evals(body: LineDict, evals: dict[str, EvalSpec], file: str, node: str
                     ) -> tuple[str, ...]:
    """A node's ``evals: [NAME, ...]``: names of the Mergefile's evals, each once."""
    raw = body.get("evals")
    if raw is None:
        return ()
    line = body.line_of("evals")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise MergefileError("'evals' must be a list of eval names", file=file, line=line,
                             node=node, hint="e.g. evals: [math-skill]")
    for name in raw:
        _check_eval_name(name, evals, file, line, node)
    return tuple(dict.fromkeys(raw))


def _check_eval_name(name: str, evals: dict[str, EvalSpec], file: str, line: int,
                     node: str) -> None:
    if name not in evals:
        raise MergefileError(
            f"unknown eval '{name}'", file=file, line=line, node=node,
            hint=did_you_mean(name, list(evals)) or (
                f"define it under the top-level 'evals:' ({', '.join(evals) or 'none yet'})"))


def parse_checks(body: LineDict, evals: dict[str, EvalSpec], file: str, node: str) -> Checks:
    """A merge node's ``checks:``: ``retain: R`` (0 < R) and ``EVAL: {min, max[, metric]}``."""
    raw = body.get("checks")
    if raw is None:
        return Checks()
    line = body.line_of("checks")
    if not isinstance(raw, LineDict):
        raise MergefileError("'checks' must be a mapping", file=file, line=line, node=node,
                             hint="e.g. checks: {retain: 0.9, fluency: {max: 30}}")
    retain = None
    bounds = []
    for key, value in raw.items():
        at = raw.line_of(key)
        if key == "retain":
            if not _number(value) or not 0 < value <= 10:
                raise MergefileError(f"'retain' must be a fraction > 0, got {value!r}", file=file,
                                     line=at, node=node, hint="e.g. retain: 0.9 (keep 90%)")
            retain = float(value)
            continue
        _check_eval_name(key, evals, file, at, node)
        if not isinstance(value, dict) or not value:
            raise MergefileError(f"check '{key}' must be {{min: X}}, {{max: Y}} or both",
                                 file=file, line=at, node=node)
        extra = sorted(set(value) - set(BOUND_KEYS))
        if extra:
            raise MergefileError(f"unknown key '{extra[0]}' in check '{key}'", file=file,
                                 line=line_of(value, at), node=node,
                                 hint=did_you_mean(extra[0], BOUND_KEYS)
                                 or "allowed: min, max, metric")
        low, high, metric = value.get("min"), value.get("max"), value.get("metric")
        for name, bound in (("min", low), ("max", high)):
            if bound is not None and not _number(bound):
                raise MergefileError(f"check '{key}': '{name}' must be a number, got {bound!r}",
                                     file=file, line=at, node=node)
        if low is None and high is None:
            raise MergefileError(f"check '{key}' needs 'min' or 'max'", file=file, line=at,
                                 node=node)
        if low is not None and high is not None and low > high:
            raise MergefileError(f"check '{key}': min {low} is above max {high}", file=file,
                                 line=at, node=node)
        if metric is not None and not isinstance(metric, str):
            raise MergefileError(f"check '{key}': 'metric' must be a metric name", file=file,
                                 line=at, node=node)
        bounds.append(Bound(eval=key, metric=metric,
                            min=None if low is None else float(low),
                            max=None if high is None else float(high), line=at))
    return Checks(retain=retain, bounds=tuple(bounds), line=line)


def _number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))
