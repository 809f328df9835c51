"""Which variant a sweep stands for: each variant's value under ``select:``, ranked, and why."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx

from mergebuild.errors import MergefileError
from mergebuild.plan.evaluations import Scores, retention, score_metrics
from mergebuild.spec.model import Mergefile, SelectSpec, SweepSpec
from mergebuild.spec.sweep import RETENTION, split_select_metric

__all__ = ["Ranked", "Selection", "choose", "measure", "objective", "rank", "retention_range",
           "swept_label"]


def objective(mergefile: Mergefile, graph: nx.DiGraph, select: SelectSpec, node: str,
              scores: Scores) -> float | None:
    """The value ``select`` ranks variant ``node`` by, from ``scores`` (None: not known yet).

    ``maximize/minimize: EVAL`` reads the eval's one score (``EVAL.METRIC``: that metric);
    ``retention`` is the mean, over every score metric of every eval the sweep's scored
    ancestors declare, of the variant's value as a share of that ancestor's (inverted for a
    lower-is-better metric, as ``checks: {retain}`` does, so 1.0 keeps it all either way).
    The mean ranks; `retention_range` also gives the worst share, which a report shows so a
    variant that trades one skill away for another is visible.

    Raises:
        MergefileError: ``EVAL`` gives several scores and the select names none of them.
    """
    if select.metric == RETENTION:
        found = retention_range(mergefile, graph, node, scores)
        return None if found is None else found[0]
    eval_name, metric = _target(mergefile, select)
    values = scores(node).get(eval_name)
    if not values:
        return None
    if metric is None:
        metric = _only_score(mergefile, select, eval_name, values)
    value = values.get(metric)
    return None if value is None or math.isnan(value) else float(value)


def retention_range(mergefile: Mergefile, graph: nx.DiGraph, node: str, scores: Scores
                    ) -> tuple[float, float] | None:
    """(mean, min) of ``node``'s retention shares of its scored ancestors' own evals; None
    while any of them is unknown (an ancestor scoring 0 keeps nothing to share, so that
    metric is left out)."""
    rows = retention(mergefile, graph, node, scores)
    if not rows or any(r.value is None or r.ancestor_value is None for r in rows):
        return None
    shares = [r.ratio for r in rows if r.ratio is not None]
    if not shares:
        return None
    return sum(shares) / len(shares), min(shares)


def _target(mergefile: Mergefile, select: SelectSpec) -> tuple[str, str | None]:
    target = split_select_metric(select.metric, mergefile.evals)
    if target is None:  # parse checks this; a hand-made Mergefile may not have been
        raise MergefileError(f"select: unknown eval '{select.metric}'",
                             file=str(mergefile.path),
                             hint=f"one of {', '.join(mergefile.evals) or 'no evals defined'}")
    return target


def _only_score(mergefile: Mergefile, select: SelectSpec, eval_name: str,
                values: Mapping[str, float]) -> str:
    scored = score_metrics(mergefile.evals[eval_name].definition, values)
    if len(scored) != 1:
        shown = ", ".join(scored) or "none"
        raise MergefileError(
            f"select: eval '{eval_name}' gives {len(scored)} scores ({shown})",
            file=str(mergefile.path),
            hint=f"name one: select: {{{select.goal}: {eval_name}.{scored[0]}}}" if scored
            else "select a metric the eval reports")
    return scored[0]


@dataclass(frozen=True)
class Ranked:
    """One variant's place: 1 is the selected one; ``value`` None ranks last (unknown)."""

    variant: str
    value: float | None
    place: int


def rank(select: SelectSpec, variants: Sequence[str],
         values: Mapping[str, float | None]) -> list[Ranked]:
    """``variants`` best first by ``select``'s goal; equal values keep grid order (the order
    of ``variants``), so the same scores always select the same variant. Values are compared
    to 12 significant digits: two means of the same shares summed in another order tie.

    Example:
        >>> [r.variant for r in rank(SelectSpec("maximize", "x"), ["a", "b", "c"],
        ...                          {"a": 0.5, "b": 0.7, "c": 0.7})]
        ['b', 'c', 'a']
    """
    sign = -1.0 if select.goal == "maximize" else 1.0

    def order(item: tuple[int, str]) -> tuple[bool, float, int]:
        index, name = item
        value = values.get(name)
        known = value is not None and not math.isnan(value)
        rounded = float(f"{value:.12g}") if known else 0.0  # type: ignore[str-format]
        return (not known, sign * rounded, index)

    ordered = sorted(enumerate(variants), key=order)
    return [Ranked(variant=name, value=values.get(name), place=place)
            for place, (_, name) in enumerate(ordered, start=1)]


def swept_label(variant: str) -> str:
    """``blend[t=0.35,code.weight=1.0]`` → ``t=0.35,code.weight=1.0``."""
    _, bracket, rest = variant.partition("[")
    return rest[:-1] if bracket and rest.endswith("]") else variant


@dataclass(frozen=True)
class Selection:
    """A sweep's resolved ``select:``: every variant ranked, the first one selected."""

    sweep: str
    select: SelectSpec
    measure: str  # what the value is, e.g. "code-skill accuracy" or "retention (mean)"
    ranking: tuple[Ranked, ...]
    worst: Mapping[str, float]  # retention only: each variant's lowest share

    @property
    def winner(self) -> str:
        return self.ranking[0].variant

    @property
    def value(self) -> float | None:
        return self.ranking[0].value

    def why(self) -> str:
        """``t=0.35,code.weight=1.0: code-skill accuracy 0.74, best of 10 (next 0.71)``."""
        first = self.ranking[0]
        text = f"{swept_label(first.variant)}: {self.measure} {_shown(first.value)}"
        if first.variant in self.worst:
            text += f" (min {_shown(self.worst[first.variant])})"
        text += f", best of {len(self.ranking)}"
        if len(self.ranking) > 1:
            runner = self.ranking[1]
            tie = (runner.value is not None and first.value is not None
                   and f"{runner.value:.12g}" == f"{first.value:.12g}")
            text += (f" (tied with {swept_label(runner.variant)}; first in grid order)" if tie
                     else f" (next {_shown(runner.value)})")
        return text

    def headline(self) -> str:
        """``blend → blend[t=0.35] (maximize code-skill: 0.74, best of 10)``."""
        return (f"{self.sweep} → {self.winner} ({self.select.goal} {self.select.metric}: "
                f"{_shown(self.value)}, best of {len(self.ranking)})")

    def as_json(self) -> dict[str, Any]:
        """The selection as recorded beside a child's build: auditable without the store."""
        return {
            "sweep": self.sweep, "goal": self.select.goal, "metric": self.select.metric,
            "measure": self.measure, "selected": self.winner, "why": self.why(),
            "ranking": [{"place": r.place, "variant": r.variant, "value": r.value,
                         **({"min": self.worst[r.variant]} if r.variant in self.worst else {})}
                        for r in self.ranking],
        }


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def choose(mergefile: Mergefile, graph: nx.DiGraph, sweep: str, scores: Scores
           ) -> Selection:
    """Rank every variant of ``sweep`` by its ``select:`` from ``scores``. The caller
    decides whether the scores are complete; a variant without a value ranks last."""
    spec = mergefile.nodes[sweep]
    assert isinstance(spec, SweepSpec) and spec.select is not None
    select = spec.select
    values: dict[str, float | None] = {}
    worst: dict[str, float] = {}
    for variant in spec.variants:
        if select.metric == RETENTION:
            found = retention_range(mergefile, graph, variant, scores)
            values[variant] = None if found is None else found[0]
            if found is not None:
                worst[variant] = found[1]
        else:
            values[variant] = objective(mergefile, graph, select, variant, scores)
    return Selection(sweep=sweep, select=select, measure=_measure(mergefile, spec, scores),
                     ranking=tuple(rank(select, spec.variants, values)), worst=worst)


def _measure(mergefile: Mergefile, spec: SweepSpec, scores: Scores) -> str:
    assert spec.select is not None
    return measure(mergefile, spec.select, spec.variants, scores)


def measure(mergefile: Mergefile, select: SelectSpec, variants: Sequence[str],
            scores: Scores) -> str:
    """What ``select``'s value is, e.g. ``code-skill accuracy`` or ``retention (mean)``."""
    if select.metric == RETENTION:
        return "retention (mean)"
    eval_name, metric = _target(mergefile, select)
    if metric is None:
        for variant in variants:
            values = scores(variant).get(eval_name)
            if values:
                metric = _only_score(mergefile, select, eval_name, values)
                break
    return f"{eval_name} {metric}" if metric else eval_name
