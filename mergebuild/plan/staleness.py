"""Planning: each node a target needs, parents first, fresh or stale with its reasons as data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from mergebuild.errors import MergefileError, StoreError
from mergebuild.evaluate.definition import EVALUATOR_VERSION
from mergebuild.io.hashing import recipe_key
from mergebuild.methods.registry import METHODS
from mergebuild.plan.evaluations import (
    EvalTask,
    Scores,
    apply_checks,
    eval_digests,
    plan_evaluations,
    required_evals,
)
from mergebuild.plan.lockfile import LockedResolver, adapter_entry
from mergebuild.plan.recipe import build_recipe, parent_names, recipe_changes
from mergebuild.plan.search import Study, Trial, TrialOutcome, run_study
from mergebuild.plan.selection import objective
from mergebuild.sources.resolve import ResolvedSource, adapted_digest
from mergebuild.spec.graph import build_order, check_targets, default_targets
from mergebuild.spec.model import (
    AdaptedSpec,
    Mergefile,
    MergeSpec,
    NodeKind,
    SearchSpec,
    SourceSpec,
    SweepSpec,
)
from mergebuild.spec.search import register_trial, trial_spec
from mergebuild.store.objects import Store
from mergebuild.store.results import ResultStore


@dataclass
class NodeState:
    """One node of a plan: its identity, whether it must be built, and why."""

    name: str
    kind: NodeKind  # "adapted": a merge's output read through a LoRA
    status: str  # "source" | "fresh" | "stale" | "pending" (adapted, its merge is stale)
    reasons: list[str] = field(default_factory=list)
    key: str | None = None
    digest: str | None = None
    path: Path | None = None
    method: str | None = None
    recipe: dict[str, Any] | None = None
    source: ResolvedSource | None = None
    adapter: ResolvedSource | None = None  # the LoRA of an "adapted" node
    evaluations: list[EvalTask] = field(default_factory=list)  # cached or pending, with why
    study: Study | None = None  # a search's: its trials so far, the best, what is next


class Planner:
    """Decides what is stale, and why, from the Mergefile, the store's metadata and the lock.

    Reads no weight bytes: local sources are identified through the stat cache, built nodes
    through the store's metadata. Imports no torch.
    """

    def __init__(self, mergefile: Mergefile, graph: nx.DiGraph, store: Store,
                 sources: LockedResolver) -> None:
        self.mergefile = mergefile
        self.graph = graph
        self.store = store
        self.sources = sources
        self.refs = store.refs_of(mergefile.path)

    def targets_or_default(self, targets: list[str] | tuple[str, ...]) -> list[str]:
        targets = list(targets) or default_targets(self.graph)
        if not targets:
            raise MergefileError("the Mergefile has no merge nodes: nothing to plan or build",
                                 file=str(self.mergefile.path),
                                 hint="add a node with 'merge_method:', as in Mergefile.example")
        check_targets(self.mergefile, targets)
        return targets

    def plan(self, targets: list[str] | tuple[str, ...] = (), force: bool = False
             ) -> list[NodeState]:
        """Each node the targets need, parents first, with its status and stale reasons."""
        targets = self.targets_or_default(targets)
        lock = self.sources.lock
        states: dict[str, NodeState] = {}
        for name in build_order(self.graph, targets):
            spec = self.mergefile.nodes[name]
            if isinstance(spec, SourceSpec):
                src = self.sources.source(spec)
                states[name] = NodeState(name=name, kind="source", status="source",
                                         digest=src.digest, source=src, path=src.directory,
                                         reasons=lock.changes(spec.name, spec.uri, src))
                continue
            if isinstance(spec, AdaptedSpec):
                adapter = self.sources.adapter(spec)
                states[name] = NodeState(
                    name=name, kind="adapted", status="pending", method="lora",
                    adapter=adapter,
                    reasons=lock.changes(adapter_entry(name), spec.adapter, adapter))
                adapt(states[name], spec, states[spec.model])
                continue
            if isinstance(spec, SweepSpec):
                states[name] = sweep_state(spec, states)
                continue
            if isinstance(spec, SearchSpec):
                states[name] = self._plan_search(spec, states, force and name in targets)
                continue
            # A variant of a swept target is forced with it (--force rebuilds the sweep).
            forced = force and (name in targets or any(
                isinstance(self.mergefile.nodes[t], SweepSpec)
                and name in self.mergefile.nodes[t].variants for t in targets))  # type: ignore[union-attr]
            states[name] = self._plan_merge(spec, states, forced)
        if self.mergefile.evals:
            self.plan_evaluations(list(states.values()))
        return list(states.values())

    def plan_evaluations(self, states: list[NodeState]) -> None:
        """Fill each state's evaluations (cached or pending, with reasons) from its digest."""
        digests = eval_digests(self.mergefile)
        results = ResultStore(self.store)
        for state in states:
            if state.kind != "adapted":
                state.evaluations = plan_evaluations(
                    self.mergefile, self.graph, state.name,
                    state.digest if state.status in ("source", "fresh") else None,
                    results, digests)

    def _plan_search(self, spec: SearchSpec, states: dict[str, NodeState], force: bool
                     ) -> NodeState:
        """A search is fresh once every trial is built and scored; it then stands for the
        best trial (its key, digest and directory). The trials the store already holds
        join the plan (as fresh nodes), and so does the next one (stale), before it."""
        state = NodeState(name=spec.name, kind="search", status="stale",
                          method=spec.template.method)
        pending = [r for r in spec.template.parent_refs() if states[r].digest is None]
        if pending:
            state.reasons = [f"waits for {pending[0]} (stale)"]
            return state
        if force:
            state.reasons = ["forced (--force): every trial is rebuilt"]
            return state
        study = self.study(spec, states)
        state.study = study
        best = study.best
        if study.complete and best is not None:
            found = self.store.lookup(best.key) if best.key else None
            if found is not None:
                state.status, state.key = "fresh", best.key
                state.digest, state.path = found.digest, found.path
                return state
        if study.complete:
            state.reasons = ["no trial can be ranked: " + "; ".join(
                sorted({t.excluded or "no score" for t in study.trials}))]
        else:
            state.reasons = [study.progress() + (
                f"; next: {study.next.name} ({study.waiting})" if study.next else "")]
        return state

    def study(self, spec: SearchSpec, states: dict[str, NodeState]) -> Study:
        """Replay ``spec``'s study from the store: each trial the store holds, built and
        scored, is told its objective; it stops at the first trial that is not (planned
        stale, or fresh with its evaluations pending). Builds and evaluates nothing."""
        results = ResultStore(self.store)
        digests = eval_digests(self.mergefile)

        def scores(node: str) -> Scores:
            state = states.get(node)
            digest = state.digest if state is not None and state.status in (
                "source", "fresh") else None
            out: dict[str, dict[str, float]] = {}
            for name in required_evals(self.mergefile, self.graph, node) if digest else ():
                record = results.read(digest, digests[name], EVALUATOR_VERSION)  # type: ignore[arg-type]
                if record is not None:
                    out[name] = {k: float(v) for k, v in record["metrics"].items()}
            return out

        def outcome(trial: Trial) -> TrialOutcome | str:
            planned = self.trial_state(spec, trial, states)
            if planned.status != "fresh":
                return "; ".join(planned.reasons) or "not built"
            return judge_trial(self.mergefile, self.graph, spec, planned, scores) or \
                "not scored yet"

        return run_study(self.mergefile, spec, outcome)

    def trial_state(self, spec: SearchSpec, trial: Trial, states: dict[str, NodeState]
                    ) -> NodeState:
        """``trial``'s node registered with the graph and planned (once) into ``states``."""
        if trial.name not in states:
            node = trial_spec(self.mergefile, spec, trial.point)
            register_trial(self.mergefile, self.graph, spec, node)
            states[trial.name] = self._plan_merge(node, states, False)
        return states[trial.name]

    def _plan_merge(self, spec: MergeSpec, states: dict[str, NodeState], force: bool
                    ) -> NodeState:
        method = METHODS[spec.method]
        pending = [r for r in spec.parent_refs() if states[r].digest is None]
        recipe = build_recipe(spec, method,
                              lambda ref: states[ref].digest or f"pending:{ref}",
                              self.mergefile.defaults)
        state = NodeState(name=spec.name, kind="merge", status="stale", method=method.name,
                          recipe=recipe)
        previous = self.refs.read(spec.name)
        if pending:
            if previous and isinstance(previous.get("recipe"), dict):
                reasons = recipe_changes(previous["recipe"], recipe, parent_names(spec, method))
                reasons = [r + (" (stale)" if r.split(": ", 1)[-1] in pending else "")
                           for r in reasons]
            else:
                reasons = ["new node"]
            state.reasons = reasons
            return state
        key = recipe_key(recipe)
        state.key = key
        found = self.store.lookup(key)
        if found and not force:
            state.status, state.digest, state.path = "fresh", found.digest, found.path
            return state
        if force:
            state.reasons = ["forced (--force)"]
        elif self.store.object_dir(key).exists():
            state.reasons = ["output corrupt or incomplete in the store"]
        elif previous is None:
            state.reasons = ["new node"]
        elif previous.get("key") == key:
            state.reasons = ["output missing from the store"]
        else:
            state.reasons = recipe_changes(previous.get("recipe") or {}, recipe,
                                           parent_names(spec, method))
        return state

    def current(self, node: str) -> NodeState:
        """``node``'s planned state, which has a directory (a source available here, or a
        fresh build); StoreError otherwise."""
        check_targets(self.mergefile, [node])
        state = next(s for s in self.plan([node]) if s.name == node)
        if state.status == "source":
            if state.path is None or not state.path.exists():
                raise StoreError("source is not available locally", node=node,
                                 hint="run 'mergebuild make' on a node that uses it")
            return state
        if state.kind == "adapted":
            model = self.mergefile.nodes[node].model  # type: ignore[union-attr]
            raise StoreError("is a merge's output read through a LoRA while a child builds; "
                             "it has no directory of its own", node=node,
                             hint=f"'mergebuild path {model}' is the merge without the adapter")
        if state.status != "fresh" or state.path is None:
            why = "; ".join(state.reasons) or "stale"
            raise StoreError(f"not built ({why})", node=node,
                             hint=f"run 'mergebuild make {node}'")
        return state

    def build_dir(self, node: str) -> Path:
        """The store directory of ``node``'s current key, even if it fails the cheap
        integrity check (so that ``verify`` can say why); else its current directory."""
        state = next(s for s in self.plan([node]) if s.name == node)
        if state.kind == "merge" and state.key and self.store.object_dir(state.key).is_dir():
            return self.store.object_dir(state.key)
        path = self.current(node).path
        assert path is not None
        return path

    def live_keys(self) -> set[str]:
        """The keys this Mergefile still reaches: every merge node's current key (planned
        over all nodes), and the key each merge node still here was last built as (its ref),
        so editing a knob and running ``gc`` before ``make`` keeps the last build.

        Raises:
            MergebuildError: a node cannot be planned (a source is missing, the hub is
                unreachable).
        """
        states = self.plan(list(self.mergefile.nodes))
        keys = {s.key for s in states if s.kind == "merge" and s.key}
        for name, spec in self.mergefile.nodes.items():
            ref = self.refs.read(name)
            if isinstance(spec, MergeSpec) and ref and ref.get("key"):
                keys.add(str(ref["key"]))
            if isinstance(spec, SearchSpec) and ref:
                # every trial the last make recorded (a trial past one gc'd would be reached
                # again by rebuilding that one, to the same values)
                history = (ref.get("study") or {}).get("history") or []
                keys.update(str(t["key"]) for t in history
                            if isinstance(t, dict) and t.get("key"))
        return keys


def adapt(state: NodeState, spec: AdaptedSpec, model: NodeState) -> None:
    """An adapted node's identity, the merge's digest combined with its LoRA's: known once
    the merge is fresh or built; until then the node is pending (and so are its children)."""
    assert state.adapter is not None
    waiting = f"waits for {spec.model} (stale)"
    if model.digest is None:
        state.status, state.digest = "pending", None
        if waiting not in state.reasons:
            state.reasons.insert(0, waiting)
        return
    state.status = "fresh"
    state.digest = adapted_digest(model.digest, state.adapter.digest)
    state.reasons = [r for r in state.reasons if r != waiting]


def judge_trial(mergefile: Mergefile, graph: nx.DiGraph, spec: SearchSpec, state: NodeState,
                scores: Callable[[str], Scores]) -> TrialOutcome | None:
    """A built trial's objective under ``select:`` from ``scores`` (None: not all known). A
    trial that fails its checks (the template's ``checks:``) is kept out of the ranking."""
    assert state.key is not None and state.digest is not None
    value = objective(mergefile, graph, spec.select, state.name, scores)
    if value is None:
        return None
    failed = [c for c in apply_checks(mergefile, graph, state.name, scores) if not c.passed]
    if failed:
        return TrialOutcome(key=state.key, digest=state.digest, value=None,
                            excluded=f"failed check {failed[0].describe()}")
    return TrialOutcome(key=state.key, digest=state.digest, value=value)


def sweep_state(spec: SweepSpec, states: dict[str, NodeState]) -> NodeState:
    """A sweep is fresh when every variant is; it builds nothing of its own."""
    variants = [states[v] for v in spec.variants]
    stale = [v for v in variants if v.status != "fresh"]
    keyed = [v.key for v in variants if v.key]
    state = NodeState(name=spec.name, kind="sweep", status="stale" if stale else "fresh",
                      method=f"sweep ({len(variants)} variants)")
    if stale:
        same = len(keyed) - len(set(keyed))
        state.reasons = [f"{len(stale)} of {len(variants)} variants to build"
                         + (f"; {same} give a recipe another variant gives (built once)"
                            if same else "")]
    return state
