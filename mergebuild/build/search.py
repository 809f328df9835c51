"""Making a search: its study run in the make loop, one trial at a time (each needs the
scores of those before it), every trial an ordinary build scored by the evaluations."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.build.evaluation import Evaluations
from mergebuild.build.events import NodeResult, Reporter
from mergebuild.errors import MergebuildError
from mergebuild.plan.search import Study, Trial, TrialOutcome, run_study, study_selection
from mergebuild.plan.staleness import NodeState, judge_trial
from mergebuild.spec.model import MergeSpec, SearchSpec

if TYPE_CHECKING:
    from mergebuild.build.make import Maker


def make_search(maker: Maker, spec: SearchSpec, state: NodeState,
                states: dict[str, NodeState], *, force: bool, device: str | None,
                reporter: Reporter, evaluations: Evaluations | None) -> list[NodeResult]:
    """Run ``spec``'s study to its last trial: replay the trials the store holds (no build,
    no evaluation), build and score the others in turn. ``state`` then stands for the best
    trial, and the study is recorded in the search's ref. Returns a result per trial built
    or reused here, then the search's own (``fresh``: it builds nothing of its own)."""
    assert evaluations is not None  # a search's Mergefile has evals (parse checks)
    results: list[NodeResult] = []
    work = {"builds": 0, "evaluations": evaluations.runs}

    def outcome(trial: Trial) -> TrialOutcome:
        planned = maker.planner.trial_state(spec, trial, states)
        if force and planned.name not in forced:
            forced.add(planned.name)
            planned.status = "stale"
        if planned.status != "dropped":  # gc removed a loser: its digest and scores do
            build(planned, force)
        assert planned.digest is not None
        evaluations.know(trial.name, planned.digest)
        evaluations.ensure(trial.name, planned.digest, planned.path)
        judged = judge_trial(maker.mergefile, maker.graph, spec, planned, evaluations.scores)
        if judged is not None and judged.excluded is not None and planned.name in made:
            reporter.excluded(planned.name, spec.name, evaluations.checks(planned.name))
        if judged is None:
            raise MergebuildError(f"trial {trial.name} was scored, and select "
                                  f"'{spec.select.metric}' finds no value in its scores",
                                  node=spec.name,
                                  hint="check which metrics the selected eval reports")
        return judged

    def build(planned: NodeState, forced_now: bool) -> None:
        node = maker.mergefile.nodes[planned.name]
        assert isinstance(node, MergeSpec)
        result = maker.make_trial(node, planned, states, forced_now and
                                  planned.status == "stale", device, reporter, evaluations)
        if result.outcome != "fresh":
            results.append(result)
            reporter.node_done(result)
            made.add(result.name)
            work["builds"] += result.outcome == "built"

    forced: set[str] = set()
    made: set[str] = set()  # trials built (or reused) by this make: their exclusion is news
    study: Study = run_study(maker.mergefile, spec, outcome)  # type: ignore[arg-type]
    best = study.best
    state.study = study
    if best is None:  # every trial failed its checks: refused as a sweep's selection is
        refused = study_selection(maker.mergefile, maker.graph, study,
                                  evaluations.scores).refused()
        return [*results, NodeResult(spec.name, "failed", refused or study.why())]
    chosen = states[best.name]
    if chosen.status != "fresh" or chosen.path is None:  # selected after gc removed it
        chosen.status, chosen.reasons = "stale", [f"selected by {spec.name}; removed by gc"]
        build(chosen, False)
    state.selection = study_selection(maker.mergefile, maker.graph, study, evaluations.scores)
    state.status, state.key, state.digest, state.path = (
        "fresh", chosen.key, chosen.digest, chosen.path)
    record = {"key": chosen.key, "digest": chosen.digest, "selected": best.name,
              "study": study.as_json()}
    if maker.refs.read(spec.name) != record:
        maker.refs.write(spec.name, record)
    assert state.digest is not None
    evaluations.know(spec.name, state.digest)
    evaluations.ensure(spec.name, state.digest, state.path)
    if work["builds"] or evaluations.runs > work["evaluations"]:
        reporter.selected(state.selection)
    return [*results, NodeResult(spec.name, "fresh", f"selected {best.name}: {study.why()}",
                                 path=state.path)]
