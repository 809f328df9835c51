"""A search's study, replayed from the store: Optuna's ask/tell with a seeded sampler, told
only the scores of content-addressed builds, so the study is never stored, only re-derived.

Trial i's values are a function of (sampler, seed, space, the values told for trials 0..i-1);
every told value is the ``select:`` objective of a build found by its key and of evaluation
results found by (model digest, eval digest). Replaying trials 0..n-1 therefore re-creates the
study exactly: a rerun with more trials finds the first ones in the store (no build, no
evaluation) and asks for the new ones. Optuna is imported only here, and only when a search
is planned or made.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mergebuild.errors import MergefileError
from mergebuild.plan.evaluations import Scores
from mergebuild.plan.selection import Selection, measure, rank, retention_range
from mergebuild.spec.graph import Dag
from mergebuild.spec.model import Mergefile, SearchDimension, SearchSpec
from mergebuild.spec.search import SIGNIFICANT_DIGITS, rounded
from mergebuild.spec.sweep import RETENTION, variant_name

__all__ = ["Study", "Trial", "TrialOutcome", "run_study", "study_selection"]


@dataclass(frozen=True)
class TrialOutcome:
    """What one trial gave: its build and the objective (None: not a finite value), and why
    it is kept out of the ranking (``excluded``: a failed check; its value is still shown)."""

    key: str
    digest: str
    value: float | None
    excluded: str | None = None


@dataclass(frozen=True)
class Trial:
    """One trial of a study: its number, values, node name, build and objective."""

    number: int
    name: str
    point: Mapping[str, Any]
    key: str | None = None
    digest: str | None = None
    value: float | None = None
    excluded: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"number": self.number, "name": self.name, "params": dict(self.point),
                "key": self.key, "digest": self.digest, "value": self.value,
                **({"excluded": self.excluded} if self.excluded else {})}


@dataclass(frozen=True)
class Study:
    """How far a search has got: the trials done (built and scored), in order, and the next
    one with why it is not done (None once every trial is)."""

    search: SearchSpec
    trials: tuple[Trial, ...]
    next: Trial | None = None
    waiting: str | None = None  # "not built", "not scored", …

    @property
    def complete(self) -> bool:
        return len(self.trials) == self.search.trials

    @property
    def ranked(self) -> list[Trial]:
        """Rankable trials (a value, no failed check), best first; equal values keep trial
        order (the earlier wins)."""
        sign = -1.0 if self.search.select.goal == "maximize" else 1.0
        scored = [t for t in self.trials if t.value is not None and t.excluded is None]
        return sorted(scored, key=lambda t: (sign * t.value, t.number))  # type: ignore[operator]

    @property
    def best(self) -> Trial | None:
        ranked = self.ranked
        return ranked[0] if ranked else None

    def progress(self) -> str:
        """``12 of 24 trials done, best tuned[density=0.41] (math-skill 0.83)``."""
        text = f"{len(self.trials)} of {self.search.trials} trials done"
        best = self.best
        if best is not None:
            text += f", best {best.name} ({self.search.select.metric} {best.value:.4g})"
        return text

    def why(self) -> str:
        """Why the best trial won, in one line."""
        best = self.best
        if best is None:
            return "no trial could be ranked"
        select = self.search.select
        ranked = self.ranked
        text = (f"trial {best.number} has the {'highest' if select.goal == 'maximize' else 'lowest'}"
                f" {select.metric} ({best.value:.4g}) of {len(ranked)} ranked trials")
        if len(ranked) > 1:
            runner = ranked[1]
            text += (f"; tied with trial {runner.number}, the earlier wins"
                     if runner.value == best.value else
                     f"; next: trial {runner.number} ({runner.value:.4g})")
        excluded = len(self.trials) - len(ranked)
        if excluded:
            text += f"; {excluded} excluded"
        return text

    def as_json(self) -> dict[str, Any]:
        """The study as recorded: sampler, seed, space, every trial, the winner and why."""
        search = self.search
        best = self.best
        return {
            "sampler": search.sampler, "seed": search.seed, "trials": search.trials,
            "rounding": f"floats to {SIGNIFICANT_DIGITS} significant digits",
            "space": {d.path: _space_json(d) for d in search.space},
            "select": {search.select.goal: search.select.metric},
            "done": len(self.trials),
            "history": [t.as_json() for t in self.trials],
            "best": None if best is None else best.name,
            "why": self.why(),
        }


def _space_json(dimension: SearchDimension) -> Any:
    if dimension.kind == "categorical":
        return list(dimension.choices)
    return [dimension.low, dimension.high]


# outcome(trial) → the trial's build and objective, or why it is not done (a plan stops
# there; a make builds and scores it instead).
Outcome = Callable[[Trial], "TrialOutcome | str"]


def run_study(mergefile: Mergefile, search: SearchSpec, outcome: Outcome) -> Study:
    """Ask for each trial in turn, tell it ``outcome``'s value; stop at a trial not done."""
    optuna = load_optuna(mergefile, search)
    with _quiet(optuna):
        study = optuna.create_study(direction=search.select.goal,
                                    sampler=_sampler(optuna, search))
        distributions = {d.path: _distribution(optuna, d) for d in search.space}
        done: list[Trial] = []
        for number in range(search.trials):
            asked = study.ask(distributions)
            point = {d.path: rounded(d, asked.params[d.path]) for d in search.space}
            trial = Trial(number=number, name=variant_name(search.name, point), point=point)
            result = outcome(trial)
            if isinstance(result, str):
                return Study(search=search, trials=tuple(done), next=trial, waiting=result)
            value = result.value
            if value is not None and not math.isfinite(value):
                value = None
            if value is None or result.excluded is not None:
                study.tell(asked, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(asked, value)
            done.append(Trial(number=number, name=trial.name, point=point, key=result.key,
                              digest=result.digest, value=value, excluded=result.excluded))
    return Study(search=search, trials=tuple(done))


def study_selection(mergefile: Mergefile, graph: Dag, study: Study,
                    scores: Scores) -> Selection:
    """A finished study as a sweep's selection is told (a child's record, ``plan``, ``make``):
    its trials ranked by their told values, ties to the earlier trial, as the study ranks;
    a trial that failed its checks after the rest, as a sweep's variant (see `judge`)."""
    select = study.search.select
    names = list(dict.fromkeys(t.name for t in study.trials))
    values = {t.name: t.value for t in study.trials}
    failed = {t.name: t.excluded for t in study.trials if t.excluded is not None}
    worst: dict[str, float] = {}
    if select.metric == RETENTION:
        for name in names:
            found = retention_range(mergefile, graph, name, scores)
            if found is not None:
                worst[name] = found[1]
    return Selection(sweep=study.search.name, select=select,
                     measure=measure(mergefile, select, names, scores),
                     ranking=tuple(rank(select, names, values, failed)), worst=worst,
                     noun="trial")


def load_optuna(mergefile: Mergefile, search: SearchSpec) -> Any:
    """The optuna module; a one-line MergefileError naming the extra when it is missing."""
    try:
        optuna = importlib.import_module("optuna")
        if search.sampler == "cmaes":
            importlib.import_module("cmaes")
    except ImportError as exc:
        raise MergefileError(
            f"a search needs {exc.name or 'optuna'}, which is not installed",
            file=str(mergefile.path), line=search.line, node=search.name,
            hint="pip install 'mergebuild[search]'") from None
    return optuna


def _sampler(optuna: Any, search: SearchSpec) -> Any:
    samplers = optuna.samplers
    if search.sampler == "random":
        return samplers.RandomSampler(seed=search.seed)
    if search.sampler == "cmaes":
        return samplers.CmaEsSampler(seed=search.seed, warn_independent_sampling=False)
    return samplers.TPESampler(seed=search.seed)


def _distribution(optuna: Any, dimension: SearchDimension) -> Any:
    distributions = optuna.distributions
    if dimension.kind == "float":
        return distributions.FloatDistribution(dimension.low, dimension.high)
    if dimension.kind == "int":
        return distributions.IntDistribution(dimension.low, dimension.high)
    return distributions.CategoricalDistribution(list(dimension.choices))


@contextlib.contextmanager
def _quiet(optuna: Any) -> Iterator[None]:
    """Optuna logs every told trial and warns about experimental features; make reports
    trials itself, so both are silenced while the study runs (and restored after)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
