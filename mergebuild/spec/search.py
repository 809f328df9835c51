"""Searches: a merge node's ``search:`` read into a SearchSpec, and each trial as a merge node."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mergebuild.errors import MergefileError, shorten
from mergebuild.methods.registry import METHODS
from mergebuild.spec.graph import Dag
from mergebuild.spec.model import (
    SAMPLERS,
    Mergefile,
    MergeSpec,
    SearchDimension,
    SearchSpec,
    SelectSpec,
)
from mergebuild.spec.sweep import apply_point, format_value, variant_name
from mergebuild.spec.validate import SEARCH_KEYS, check_keys, did_you_mean, validate_parameters
from mergebuild.spec.yaml_lines import LineDict

# More trials than this is a typo, not a study: every trial is a build and an evaluation.
MAX_TRIALS = 1000
# numpy's RandomState, which Optuna's samplers seed, takes seeds in [0, 2**32).
MAX_SEED = 2**32 - 1
# A suggested float is rounded to this many significant digits: the value a trial's name
# shows is the value its recipe (and so its key) holds.
SIGNIFICANT_DIGITS = 4
_HINT = "search: {sampler: tpe, trials: 24, seed: 0, space: {density: [0.2, 0.9]}}"


def parse_search(value: Any, template: MergeSpec, select: SelectSpec | None, file: str,
                 line: int) -> tuple[SearchSpec, list[str]]:
    """``search:`` of the merge node ``template`` → its SearchSpec, and the warnings its
    space's extreme points give (a parameter the method ignores, say)."""
    node = template.name

    def error(message: str, hint: str | None = _HINT) -> MergefileError:
        return MergefileError(message, file=file, line=line, node=node, hint=hint)

    if not isinstance(value, LineDict):
        raise error("'search' must be a mapping with sampler, trials, seed and space")
    check_keys(value, SEARCH_KEYS, "'search'", file, node)
    sampler = value.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise error(f"unknown sampler {shorten(sampler)}",
                    did_you_mean(str(sampler), SAMPLERS) or "use tpe, cmaes or random")
    trials = value.get("trials")
    if not _whole(trials) or not 1 <= trials <= MAX_TRIALS:
        raise error(f"'trials' must be a whole number from 1 to {MAX_TRIALS}, "
                    f"got {shorten(trials)}", "trials: 24")
    seed = value.get("seed", 0)
    if not _whole(seed) or not 0 <= seed <= MAX_SEED:
        raise error(f"'seed' must be a whole number from 0 to {MAX_SEED}, got {shorten(seed)}",
                    "seed: 0 (the same seed and scores give the same trials)")
    space = value.get("space")
    if not isinstance(space, Mapping) or not space:
        raise error("'search' needs a 'space' mapping parameter paths to ranges",
                    "space: {density: [0.2, 0.9], models.math.weight: [0.1, 1.0]}")
    dimensions = tuple(_dimension(str(path), bounds, error) for path, bounds in space.items())
    if sampler == "cmaes":
        categorical = [d.path for d in dimensions if d.kind == "categorical"]
        if categorical:
            raise error(f"the cmaes sampler searches numbers; '{categorical[0]}' is a list "
                        "of choices", "use sampler: tpe or random, or a [low, high] range")
    if select is None:
        raise error("a search needs 'select' to say which trial is best",
                    "select: {maximize: retention} or {maximize: EVAL}")
    spec = SearchSpec(name=node, template=template, sampler=sampler, trials=trials,
                      seed=seed, space=dimensions, select=select, line=template.line)
    warnings: list[str] = []
    for point in _extremes(dimensions):  # a bad path or out-of-range value fails here
        trial = apply_point(template, point, file, line)
        try:
            found = validate_parameters(trial, METHODS[trial.method], file)
        except MergefileError as exc:  # said of the search, at its space's line
            raise error(f"the space reaches {trial.name.removeprefix(node)}: {exc.message}",
                        exc.hint) from None
        warnings.extend(w for w in found if w not in warnings)
    return spec, warnings


def longest_trial_name(search: SearchSpec) -> int:
    """The most characters a trial's name can have (a float shows at most 10: ``-1.234e-05``)."""
    widest = {}
    for d in search.space:
        if d.kind == "categorical":
            widest[d.path] = "x" * max(len(format_value(c)) for c in d.choices)
        elif d.kind == "int":
            widest[d.path] = "x" * max(len(str(d.low)), len(str(d.high)))
        else:
            widest[d.path] = "x" * 10
    return len(variant_name(search.name, widest))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


def _dimension(path: str, bounds: Any, error) -> SearchDimension:
    """``[low, high]`` of numbers → a range (int when both are whole); any other list of two
    or more values (strings, booleans, or more than two numbers) → choices."""
    if not isinstance(bounds, list) or len(bounds) < 2 or not all(
            isinstance(v, (int, float, str, bool)) for v in bounds):
        raise error(f"space '{path}' must be [low, high] or a list of choices, got "
                    f"{shorten(bounds)}", f"{path}: [0.2, 0.9]")
    if len(bounds) == 2 and all(_number(v) for v in bounds):
        low, high = bounds
        if not low < high:
            raise error(f"space '{path}': low {low} must be below high {high}",
                        f"{path}: [{high}, {low}]" if low > high else None)
        if _whole(low) and _whole(high):
            return SearchDimension(path=path, kind="int", low=low, high=high)
        return SearchDimension(path=path, kind="float", low=float(low), high=float(high))
    if len(set(map(repr, bounds))) != len(bounds):
        raise error(f"space '{path}' lists a choice twice", None)
    return SearchDimension(path=path, kind="categorical", choices=tuple(bounds))


def _extremes(dimensions: tuple[SearchDimension, ...]) -> list[dict[str, Any]]:
    """The space's lowest and highest points (first and last choices): what parsing checks."""
    low = {d.path: d.choices[0] if d.kind == "categorical" else d.low for d in dimensions}
    high = {d.path: d.choices[-1] if d.kind == "categorical" else d.high for d in dimensions}
    return [low, high]


def rounded(dimension: SearchDimension, value: Any) -> Any:
    """A suggested value as the trial uses it: a float to SIGNIFICANT_DIGITS digits (kept
    within the range), an int as an int, a choice as written.

    Example:
        >>> rounded(SearchDimension("t", "float", 0.0, 1.0), 0.413749)
        0.4137
    """
    if dimension.kind == "float":
        value = float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")
        return min(max(value, dimension.low), dimension.high)  # type: ignore[type-var]
    if dimension.kind == "int":
        return int(value)
    return value


def trial_spec(mergefile: Mergefile, search: SearchSpec, point: Mapping[str, Any]) -> MergeSpec:
    """The merge node of one trial: the template with the point's values, named for them,
    written (for its provenance's Mergefile excerpt) as the merge it is, without search, as
    a sweep's variant is (`apply_point`)."""
    spec = apply_point(search.template, point, str(mergefile.path), search.line)
    assert spec.name == variant_name(search.name, point)
    return spec


def register_trial(mergefile: Mergefile, graph: Dag, search: SearchSpec,
                   trial: MergeSpec) -> None:
    """Make ``trial`` a node of the Mergefile and its graph (parents → trial → search), as a
    sweep's variants are from the start: a search's trials exist once the study reaches
    them. Registering the same trial again changes nothing."""
    if trial.name in mergefile.nodes:
        return
    mergefile.nodes[trial.name] = trial  # type: ignore[index]  # the parsed dict
    graph.add_node(trial.name, spec=trial, trial_of=search.name)
    for ref in trial.parent_refs():
        graph.add_edge(ref, trial.name)
    graph.add_edge(trial.name, search.name)
