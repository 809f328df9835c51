"""Which variant a sweep stands for: each variant's value under ``select:``, ranked, and why."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergebuild.errors import MergefileError
from mergebuild.plan.evaluations import Scores, apply_checks, retention, score_metrics
from mergebuild.spec.graph import Dag
from mergebuild.spec.model import Mergefile, SelectSpec, SweepSpec
from mergebuild.spec.sweep import RETENTION, split_select_metric

__all__ = ["Judged", "Ranked", "Selection", "choose", "judge", "measure", "objective", "rank",
           "retention_range", "swept_label"]


def objective(mergefile: Mergefile, graph: Dag, select: SelectSpec, node: str,
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


@dataclass(frozen=True)
class Judged:
    """One variant (or trial) under its ``select:``: the value it ranks by (None: not known
    yet), retention's lowest share, and why it is kept out of the ranking (None: it is not).
    """

    value: float | None
    worst: float | None = None
    failed: str | None = None  # e.g. "failed: code-skill accuracy 0.4 < 0.5 (min)"


def judge(mergefile: Mergefile, graph: Dag, select: SelectSpec, node: str,
          scores: Scores) -> Judged:
    """The rule sweeps and searches rank by: ``node``'s objective under ``select``, and its
    own ``checks:`` (the template's): a variant that fails one is measured, shown, and kept
    out of the ranking, so the best variant that passes is selected."""
    if select.metric == RETENTION:
        found = retention_range(mergefile, graph, node, scores)
        value, worst = found if found is not None else (None, None)
    else:
        value, worst = objective(mergefile, graph, select, node, scores), None
    failures = [c for c in apply_checks(mergefile, graph, node, scores) if not c.passed]
    failed = "failed: " + "; ".join(c.condition() for c in failures) if failures else None
    return Judged(value=value, worst=worst, failed=failed)


def retention_range(mergefile: Mergefile, graph: Dag, node: str, scores: Scores
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
    """One variant's place: 1 is the selected one; ``value`` None ranks last (unknown), and
    after every known one, a variant that ``failed`` its checks (it is never selected)."""

    variant: str
    value: float | None
    place: int
    failed: str | None = None


def rank(select: SelectSpec, variants: Sequence[str], values: Mapping[str, float | None],
         failed: Mapping[str, str] | None = None) -> list[Ranked]:
    """``variants`` best first by ``select``'s goal, those that ``failed`` their checks after
    the rest (best first among themselves); equal values keep grid order (the order of
    ``variants``), so the same scores always select the same variant. Values are compared
    to 12 significant digits: two means of the same shares summed in another order tie.

    Example:
        >>> [r.variant for r in rank(SelectSpec("maximize", "x"), ["a", "b", "c"],
        ...                          {"a": 0.5, "b": 0.7, "c": 0.7})]
        ['b', 'c', 'a']
    """
    sign = -1.0 if select.goal == "maximize" else 1.0
    failed = failed or {}

    def order(item: tuple[int, str]) -> tuple[bool, bool, float, int]:
        index, name = item
        value = values.get(name)
        known = value is not None and not math.isnan(value)
        rounded = float(f"{value:.12g}") if known else 0.0  # type: ignore[str-format]
        return (name in failed, not known, sign * rounded, index)

    ordered = sorted(enumerate(variants), key=order)
    return [Ranked(variant=name, value=values.get(name), place=place, failed=failed.get(name))
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
    noun: str = "variant"  # "trial" for a search's

    @property
    def winner(self) -> str:
        return self.ranking[0].variant

    @property
    def value(self) -> float | None:
        return self.ranking[0].value

    @property
    def passing(self) -> tuple[Ranked, ...]:
        """The variants that passed their checks, best first."""
        return tuple(r for r in self.ranking if r.failed is None)

    def refused(self) -> str | None:
        """Why no variant can be selected (None: the first one is): none passed its checks
        (naming the best that failed), or none has a value yet."""
        first = self.ranking[0]
        if first.failed is not None:
            return (f"no {self.noun} passed its checks; the best failing is {first.variant} "
                    f"({self.measure} {_shown(first.value)}, {first.failed})")
        if first.value is None:
            return f"no {self.noun} has a value of {self.select.metric}"
        return None

    def why(self) -> str:
        """``t=0.35,code.weight=1.0: code-skill accuracy 0.74, best of 10 (next 0.71)``."""
        first = self.ranking[0]
        passing = self.passing
        text = f"{swept_label(first.variant)}: {self.measure} {_shown(first.value)}"
        if first.variant in self.worst:
            text += f" (min {_shown(self.worst[first.variant])})"
        text += f", best of {len(passing)}"
        if len(passing) > 1:
            runner = passing[1]
            tie = (runner.value is not None and first.value is not None
                   and f"{runner.value:.12g}" == f"{first.value:.12g}")
            text += (f" (tied with {swept_label(runner.variant)}; first in grid order)" if tie
                     else f" (next {_shown(runner.value)})")
        failing = len(self.ranking) - len(passing)
        if failing:
            text += f"; {failing} failed {'its' if failing == 1 else 'their'} checks"
        return text

    def headline(self) -> str:
        """``blend → blend[t=0.35] (maximize code-skill: 0.74, best of 10)``."""
        return (f"{self.sweep} → {self.winner} ({self.select.goal} {self.select.metric}: "
                f"{_shown(self.value)}, best of {len(self.passing)})")

    def as_json(self) -> dict[str, Any]:
        """The selection as recorded beside a child's build: auditable without the store."""
        return {
            "sweep": self.sweep, "goal": self.select.goal, "metric": self.select.metric,
            "measure": self.measure, "selected": self.winner, "why": self.why(),
            "ranking": [{"place": r.place, "variant": r.variant, "value": r.value,
                         **({"min": self.worst[r.variant]} if r.variant in self.worst else {}),
                         **({"failed": r.failed} if r.failed else {})}
                        for r in self.ranking],
        }


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def choose(mergefile: Mergefile, graph: Dag, sweep: str, scores: Scores
           ) -> Selection:
    """Rank every variant of ``sweep`` by its ``select:`` from ``scores`` (see `judge`). The
    caller decides whether the scores are complete; a variant without a value ranks last."""
    spec = mergefile.nodes[sweep]
    assert isinstance(spec, SweepSpec) and spec.select is not None
    select = spec.select
    judged = {v: judge(mergefile, graph, select, v, scores) for v in spec.variants}
    values = {v: j.value for v, j in judged.items()}
    worst = {v: j.worst for v, j in judged.items() if j.worst is not None}
    failed = {v: j.failed for v, j in judged.items() if j.failed is not None}
    return Selection(sweep=sweep, select=select, measure=_measure(mergefile, spec, scores),
                     ranking=tuple(rank(select, spec.variants, values, failed)), worst=worst)


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
