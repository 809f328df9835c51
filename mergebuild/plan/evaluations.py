"""Which evaluations a plan needs and why; retention against ancestors; the checks' verdicts.

Everything here is torch-free and reads only the store's result records: a node's scores
come from `ResultStore` by (model digest, eval definition digest, evaluator version).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

from mergebuild.errors import EvaluationError, MergefileError
from mergebuild.evaluate.definition import EVALUATOR_VERSION, EvalDefinition
from mergebuild.spec.graph import Dag, ancestors, topological_order
from mergebuild.spec.model import (
    Bound,
    Mergefile,
    MergeSpec,
    SearchSpec,
    SourceSpec,
    SweepSpec,
)
from mergebuild.spec.sweep import RETENTION, split_select_metric
from mergebuild.store.results import ResultStore

__all__ = [
    "CheckOutcome",
    "EvalTask",
    "RetentionRow",
    "apply_checks",
    "declared_evals",
    "eval_digests",
    "plan_evaluations",
    "required_evals",
    "retention",
    "score_metrics",
    "selection_evals",
]

# scores(node) -> {eval name: {metric: value}} of the node's current model (what is known).
Scores = Callable[[str], Mapping[str, Mapping[str, float]]]


@dataclass(frozen=True)
class EvalTask:
    """One evaluation of one node a plan needs: ``cached`` (its result is in the store) or
    ``pending`` (it runs at the next make), with the reasons, as stale nodes have them."""

    node: str
    eval: str
    status: str  # "cached" | "pending"
    reasons: tuple[str, ...] = ()
    model_digest: str | None = None
    eval_digest: str = ""


@dataclass(frozen=True)
class RetentionRow:
    """How much of an ancestor's score on one of its own evals a node keeps.

    ``ratio`` is value/ancestor for a higher-is-better metric and ancestor/value for a
    lower-is-better one (so 1.0 is "kept it all" either way); None when the ancestor scored 0
    (nothing to keep) or a score is unknown.
    """

    node: str
    ancestor: str
    eval: str
    metric: str
    ancestor_value: float | None
    value: float | None
    higher_is_better: bool

    @property
    def ratio(self) -> float | None:
        if self.ancestor_value is None or self.value is None:
            return None
        top, bottom = ((self.value, self.ancestor_value) if self.higher_is_better
                       else (self.ancestor_value, self.value))
        if bottom == 0:
            return None if top == 0 or self.higher_is_better else math.inf
        return top / bottom


@dataclass(frozen=True)
class CheckOutcome:
    """One gate applied to one node: passed or not, with what was compared."""

    node: str
    eval: str
    metric: str
    value: float | None
    threshold: float
    passed: bool
    rule: str  # "retain" | "min" | "max"
    ancestor: str | None = None
    ancestor_value: float | None = None
    retain: float | None = None

    higher_is_better: bool = True

    def describe(self) -> str:
        """One line naming node, eval, value, threshold and (for retain) the ancestor."""
        return f"{self.node}: {self.condition()}"

    def condition(self) -> str:
        """What was compared, without the node: ``code-skill accuracy 0.4 < 0.5 (min)``."""
        shown = "not evaluated" if self.value is None else f"{self.value:.4g}"
        if self.rule == "retain":
            sign = {(True, True): ">=", (True, False): "<", (False, True): "<=",
                    (False, False): ">"}[(self.higher_is_better, self.passed)]
            return (f"{self.eval} {self.metric} {shown} {sign} {self.threshold:.4g} "
                    f"(retain {self.retain:.0%} of {self.ancestor}'s "
                    f"{self.ancestor_value:.4g})")
        sign = {("min", True): ">=", ("min", False): "<", ("max", True): "<=",
                ("max", False): ">"}[(self.rule, self.passed)]
        return f"{self.eval} {self.metric} {shown} {sign} {self.threshold:.4g} ({self.rule})"


def declared_evals(mergefile: Mergefile, node: str) -> tuple[str, ...]:
    """The evals ``node`` is scored on by its own declaration: ``evals:`` and its bounds'
    (a sweep's: its variants', written once for all of them)."""
    spec = mergefile.nodes[node]
    if isinstance(spec, SourceSpec):
        return spec.evals
    if isinstance(spec, SearchSpec):  # it stands for its best trial, scored as they are
        spec = spec.template
    if isinstance(spec, MergeSpec):
        return tuple(dict.fromkeys([*spec.evals, *(b.eval for b in spec.checks.bounds)]))
    if isinstance(spec, SweepSpec) and spec.select is not None:
        return declared_evals(mergefile, spec.variants[0])
    return ()


def retained_ancestors(mergefile: Mergefile, graph: Dag, node: str) -> list[str]:
    """The ancestors (any number of stages up) whose own evals ``node``'s retain check keeps,
    in build order: every ancestor that declares evals."""
    spec = mergefile.nodes[node]
    if not (isinstance(spec, MergeSpec) and spec.checks.retain is not None):
        return []
    return _ancestors_with_evals(mergefile, graph, node)


def required_evals(mergefile: Mergefile, graph: Dag, node: str) -> tuple[str, ...]:
    """Every eval ``node`` must be scored on: its own, with ``retain`` each retained
    ancestor's own evals (a merge is held to its parents' skills), and as a variant of a
    sweep with ``select:`` the evals the selection reads."""
    names = list(declared_evals(mergefile, node))
    for ancestor in retained_ancestors(mergefile, graph, node):
        names += declared_evals(mergefile, ancestor)
    names += selection_evals(mergefile, graph, node)
    return tuple(dict.fromkeys(names))


def selection_evals(mergefile: Mergefile, graph: Dag, node: str) -> tuple[str, ...]:
    """The evals a sweep's ``select:`` reads of ``node``, one of its variants: the named eval,
    or for retention every eval its scored ancestors declare (none when not a variant). A
    search is scored on what its trials are (it stands for the best one)."""
    names: list[str] = []
    own = mergefile.nodes.get(node)
    if isinstance(own, SearchSpec):
        if own.select.metric == RETENTION:
            for ancestor in _ancestors_with_evals(mergefile, graph, node):
                if graph.nodes[ancestor].get("trial_of") != node:
                    names += declared_evals(mergefile, ancestor)
        elif (target := split_select_metric(own.select.metric, mergefile.evals)) is not None:
            names.append(target[0])
    for sweep in graph.succ[node] if node in graph else ():
        spec = mergefile.nodes[sweep]
        if isinstance(spec, SearchSpec) and graph.nodes[node].get("trial_of") != sweep:
            continue  # a parent of the search, not one of its trials
        if not (isinstance(spec, SweepSpec | SearchSpec) and spec.select is not None):
            continue
        if spec.select.metric == RETENTION:
            for ancestor in _ancestors_with_evals(mergefile, graph, node):
                names += declared_evals(mergefile, ancestor)
            continue
        target = split_select_metric(spec.select.metric, mergefile.evals)
        if target is not None:
            names.append(target[0])
    return tuple(dict.fromkeys(names))


def eval_digests(mergefile: Mergefile) -> dict[str, str]:
    """{eval name: its definition's digest} (hashes the data files; an error names the eval)."""
    out = {}
    for name, spec in mergefile.evals.items():
        try:
            out[name] = _digest(spec.definition)
        except EvaluationError as error:
            raise MergefileError(f"eval '{name}': {error.message}", file=str(mergefile.path),
                                 line=spec.line, hint=error.hint) from None
    return out


@cache
def _digest_cached(definition: EvalDefinition, stamp: tuple) -> str:
    return definition.digest()


def _digest(definition: EvalDefinition) -> str:
    # Data files are re-hashed only when their size or mtime moved (one plan hashes once).
    stamp = []
    for path in definition.data_files().values():
        try:
            st = path.stat()
            stamp.append((str(path), st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append((str(path), None, None))
    return _digest_cached(definition, tuple(stamp))


def plan_evaluations(mergefile: Mergefile, graph: Dag, node: str,
                     model_digest: str | None, results: ResultStore,
                     digests: Mapping[str, str]) -> list[EvalTask]:
    """The evaluations ``node`` needs, cached or pending with why (``model_digest`` None: the
    node is still to be built)."""
    tasks = []
    history = results.history(node)
    for name in required_evals(mergefile, graph, node):
        digest = digests[name]
        if model_digest is None:
            tasks.append(EvalTask(node, name, "pending", ("after the build",), None, digest))
            continue
        if results.read(model_digest, digest, EVALUATOR_VERSION) is not None:
            tasks.append(EvalTask(node, name, "cached", (), model_digest, digest))
            continue
        tasks.append(EvalTask(node, name, "pending", (_why(history, model_digest, name, digest),),
                              model_digest, digest))
    return tasks


def _why(history: list[dict], model_digest: str, name: str, digest: str) -> str:
    """Why an evaluation has no stored result, from the node's history."""
    for entry in reversed(history):
        before = (entry.get("evals") or {}).get(name)
        if before is None:
            continue
        if entry.get("digest") != model_digest:
            return "model changed since last evaluated"
        if before != digest:
            return "eval definition or data changed"
        return "evaluator version changed"
    return "new eval" if history else "never evaluated"


def score_metrics(definition: EvalDefinition, metrics: Mapping[str, float]) -> list[str]:
    """The metrics of a result that are scores (not counts), in the result's order."""
    return [m for m in metrics if _direction(definition, m) is not None]


def _direction(definition: EvalDefinition, metric: str) -> bool | None:
    try:
        return definition.higher_is_better(metric)
    except KeyError:
        return None


def retention(mergefile: Mergefile, graph: Dag, node: str, scores: Scores
              ) -> list[RetentionRow]:
    """For each retained ancestor's own eval and score metric: what ``node`` keeps of it."""
    rows = []
    mine = scores(node)
    for ancestor in retained_ancestors(mergefile, graph, node) or _ancestors_with_evals(
            mergefile, graph, node):
        theirs = scores(ancestor)
        for name in declared_evals(mergefile, ancestor):
            definition = mergefile.evals[name].definition
            known = theirs.get(name) or mine.get(name) or {}
            for metric in score_metrics(definition, known):
                rows.append(RetentionRow(
                    node=node, ancestor=ancestor, eval=name, metric=metric,
                    ancestor_value=(theirs.get(name) or {}).get(metric),
                    value=(mine.get(name) or {}).get(metric),
                    higher_is_better=bool(_direction(definition, metric))))
    return rows


def _ancestors_with_evals(mergefile: Mergefile, graph: Dag, node: str) -> list[str]:
    """The ancestors that declare evals, in build order. Below a sweep with ``select:`` the
    sweep stands for its selected variant: its variants are not ancestors of their own."""
    above = ancestors(graph, node)
    for name in [node, *above]:
        spec = mergefile.nodes[name]
        if isinstance(spec, SweepSpec) and spec.select is not None:
            above.difference_update(spec.variants)
    return [a for a in topological_order(graph)
            if a in above and declared_evals(mergefile, a)]


def apply_checks(mergefile: Mergefile, graph: Dag, node: str, scores: Scores
                 ) -> list[CheckOutcome]:
    """Every gate of ``node``: its retain check per ancestor eval metric, then its bounds."""
    spec = mergefile.nodes[node]
    if not isinstance(spec, MergeSpec) or not spec.checks:
        return []
    outcomes = []
    if spec.checks.retain is not None:
        retain = spec.checks.retain
        for row in retention(mergefile, graph, node, scores):
            if row.ancestor_value is None:
                continue
            threshold = (row.ancestor_value * retain if row.higher_is_better
                         else row.ancestor_value / retain)
            ratio = row.ratio
            passed = ratio is None or ratio >= retain - 1e-12
            outcomes.append(CheckOutcome(
                node=node, eval=row.eval, metric=row.metric, value=row.value,
                threshold=threshold, passed=passed and row.value is not None, rule="retain",
                ancestor=row.ancestor, ancestor_value=row.ancestor_value, retain=retain,
                higher_is_better=row.higher_is_better))
    mine = scores(node)
    for bound in spec.checks.bounds:
        outcomes += _bound_outcomes(mergefile, node, bound, mine.get(bound.eval) or {})
    return outcomes


def _bound_outcomes(mergefile: Mergefile, node: str, bound: Bound,
                    metrics: Mapping[str, float]) -> list[CheckOutcome]:
    definition = mergefile.evals[bound.eval].definition
    metric = bound.metric
    if metric is None:
        scored = score_metrics(definition, metrics)
        if len(scored) > 1:
            raise MergefileError(
                f"check '{bound.eval}': the eval gives several scores ({', '.join(scored)})",
                file=str(mergefile.path), line=bound.line, node=node,
                hint=f"name one: {bound.eval}: {{metric: {scored[0]}, ...}}")
        metric = scored[0] if scored else _only_metric(definition)
    value = metrics.get(metric)
    out = []
    for rule, threshold in (("min", bound.min), ("max", bound.max)):
        if threshold is None:
            continue
        passed = value is not None and (value >= threshold if rule == "min"
                                        else value <= threshold)
        out.append(CheckOutcome(node=node, eval=bound.eval, metric=metric, value=value,
                                threshold=threshold, passed=passed, rule=rule,
                                higher_is_better=rule == "min"))
    return out


def _only_metric(definition: EvalDefinition) -> str:
    """The score an eval kind gives before it has run (accuracy, perplexity)."""
    return {"accuracy": "accuracy", "perplexity": "perplexity"}.get(definition.kind, "score")
