"""Planning: each node a target needs, parents first, fresh or stale with its reasons as data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebuild.errors import MergefileError, StoreError
from mergebuild.evaluate.definition import EVALUATOR_VERSION
from mergebuild.io.hashing import recipe_key
from mergebuild.methods.registry import METHODS
from mergebuild.plan.evaluations import (
    EvalTask,
    Scores,
    declared_evals,
    eval_digests,
    plan_evaluations,
    required_evals,
    retained_ancestors,
)
from mergebuild.plan.lockfile import LockedResolver, adapter_entry
from mergebuild.plan.recipe import build_recipe, parent_names, recipe_changes
from mergebuild.plan.search import Study, Trial, TrialOutcome, run_study, study_selection
from mergebuild.plan.selection import Selection, choose, judge
from mergebuild.sources.resolve import ResolvedSource, adapted_digest
from mergebuild.spec.graph import Dag, ancestors, build_order, check_targets, default_targets
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
    # "source" | "fresh" | "stale" | "pending" (adapted, its merge is stale; a sweep waiting
    # for its variants' scores) | "dropped" (a variant that lost its sweep's selection,
    # removed by gc: its digest and scores are known, its files are not kept)
    status: str
    reasons: list[str] = field(default_factory=list)
    key: str | None = None
    digest: str | None = None
    path: Path | None = None
    method: str | None = None
    recipe: dict[str, Any] | None = None
    source: ResolvedSource | None = None
    adapter: ResolvedSource | None = None  # the LoRA of an "adapted" node
    evaluations: list[EvalTask] = field(default_factory=list)  # cached or pending, with why
    selection: Selection | None = None  # a sweep with select: the variant it stands for
    study: Study | None = None  # a search's: its trials so far, the best, what is next


class Planner:
    """Decides what is stale, and why, from the Mergefile, the store's metadata and the lock.

    Reads no weight bytes: local sources are identified through the stat cache, built nodes
    through the store's metadata. Imports no torch.
    """

    def __init__(self, mergefile: Mergefile, graph: Dag, store: Store,
                 sources: LockedResolver) -> None:
        self.mergefile = mergefile
        self.graph = graph
        self.store = store
        self.sources = sources
        self.refs = store.refs_of(mergefile.path)
        self._eval_digests: dict[str, str] | None = None

    def register_trials(self, names: list[str] | tuple[str, ...]) -> None:
        """Trials named in ``names`` (``tuned[density=0.41]``) join the graph by planning
        their search: a search's trials are nodes once its study, replayed, reaches them."""
        for name in names:
            search = name.split("[", 1)[0]
            if name not in self.mergefile.nodes and isinstance(
                    self.mergefile.nodes.get(search), SearchSpec):
                self.plan([search])

    def targets_or_default(self, targets: list[str] | tuple[str, ...]) -> list[str]:
        self.register_trials(targets)
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
                if spec.select is not None:
                    self._mark_dropped(spec, states, force)
                states[name] = sweep_state(spec, states)
                if spec.select is not None:
                    self._select(spec, states)
                continue
            if isinstance(spec, SearchSpec):
                states[name] = self._plan_search(spec, states, force and name in targets)
                continue
            # A variant of a swept target is forced with it (--force rebuilds the sweep).
            forced = force and (name in targets or any(
                isinstance(self.mergefile.nodes[t], SweepSpec)
                and name in self.mergefile.nodes[t].variants for t in targets))  # type: ignore[union-attr]
            states[name] = self._plan_merge(spec, states, forced)
            if self.graph.nodes[name].get("trial_of") and not forced:
                self._mark_dropped_one(name, states, self.stored_scores(states))
        if self.mergefile.evals:
            self.plan_evaluations(list(states.values()))
        return list(states.values())

    def plan_evaluations(self, states: list[NodeState]) -> None:
        """Fill each state's evaluations (cached or pending, with reasons) from its digest."""
        digests = eval_digests(self.mergefile)
        results = ResultStore(self.store)
        for state in states:
            # A sweep's scores are its selected variant's, planned with the variant.
            if state.kind not in ("adapted", "sweep"):
                state.evaluations = plan_evaluations(
                    self.mergefile, self.graph, state.name,
                    state.digest if state.status in ("source", "fresh", "dropped") else None,
                    results, digests)

    def digests(self) -> dict[str, str]:
        """The eval definitions' digests, worked out once per planner."""
        if self._eval_digests is None:
            self._eval_digests = eval_digests(self.mergefile)
        return self._eval_digests

    def stored_scores(self, states: dict[str, NodeState]) -> Scores:
        """scores(node): what the store holds of ``node``'s planned model on the evals it
        needs (nothing for a node whose digest is not known yet)."""
        results = ResultStore(self.store)
        digests = self.digests()

        def scores(node: str) -> dict[str, dict[str, float]]:
            state = states.get(node)
            if state is None or state.digest is None:
                return {}
            out = {}
            for name in required_evals(self.mergefile, self.graph, node):
                record = results.read(state.digest, digests[name], EVALUATOR_VERSION)
                if record is not None:
                    out[name] = {k: float(v) for k, v in record["metrics"].items()}
            return out
        return scores

    def _mark_dropped(self, spec: SweepSpec, states: dict[str, NodeState], force: bool
                      ) -> None:
        """A variant gc removed after it lost the selection is not rebuilt while its recipe,
        digest and scores are what the store recorded: it is known, only not kept."""
        if force:
            return
        scores = self.stored_scores(states)
        for name in spec.variants:
            self._mark_dropped_one(name, states, scores)

    def _mark_dropped_one(self, name: str, states: dict[str, NodeState], scores: Scores
                          ) -> None:
        """One variant (or trial) of ``_mark_dropped``."""
        state = states[name]
        previous = self.refs.read(name)
        if (state.status != "stale" or state.key is None or previous is None
                or previous.get("key") != state.key or not previous.get("digest")
                or self.store.object_dir(state.key).exists()):
            return
        state.digest = str(previous["digest"])
        needed = required_evals(self.mergefile, self.graph, name)  # its checks' too
        if all(n in scores(name) for n in needed):
            state.status = "dropped"
            state.reasons = ["lost the selection and was removed by gc (scores kept)"]
        else:
            state.digest = None

    def _select(self, spec: SweepSpec, states: dict[str, NodeState]) -> None:
        """The sweep stands for its selected variant (its digest, key and directory) once
        every variant is built and scored; until then it, and its children, wait."""
        select = spec.select
        assert select is not None
        state = states[spec.name]
        goal = f"{select.goal} {select.metric}"
        if state.status == "stale":
            state.reasons = [f"{state.reasons[0]}; then selects by {goal}"]
            return
        scores = self.stored_scores(states)
        # Every eval the ranking reads: the selection's, and the variants' own checks'.
        missing = sum(1 for v in spec.variants
                      for n in required_evals(self.mergefile, self.graph, v)
                      if n not in scores(v))
        above = set(retained_ancestors(self.mergefile, self.graph, spec.variants[0]))
        if select.metric == "retention":
            above |= ancestors(self.graph, spec.variants[0])
        missing += sum(1 for a in above for n in declared_evals(self.mergefile, a)
                       if n not in scores(a))
        if missing:
            state.status = "pending"
            state.reasons = [(f"selection ({goal}) waits for {missing} "
                              f"evaluation{'s' * (missing != 1)}")]
            return
        selection = choose(self.mergefile, self.graph, spec.name, scores)
        state.selection = selection
        refused = selection.refused()
        if refused is not None:  # none passed its checks: stale, as a failed node is
            state.status = "pending" if selection.value is None else "stale"
            state.reasons = [refused]
            return
        winner = states[selection.winner]
        if winner.status == "dropped":  # selected again after gc removed it: build it back
            winner.status, winner.reasons = "stale", [f"selected by {spec.name}; removed by gc"]
            state.status = "stale"
            state.reasons = [f"selected {selection.winner}, which gc removed: rebuilt"]
            return
        state.digest, state.key, state.path = winner.digest, winner.key, winner.path
        state.reasons = []

    def _plan_search(self, spec: SearchSpec, states: dict[str, NodeState], force: bool
                     ) -> NodeState:
        """A search is fresh once every trial is built and scored; it then stands for the
        best trial (its key, digest and directory). The trials the store already holds
        join the plan (fresh, or dropped by gc with their scores kept), and so does the
        next one (stale), before it."""
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
        if not study.complete:
            state.reasons = [study.progress() + (
                f"; next: {study.next.name} ({study.waiting})" if study.next else "")]
            return state
        state.selection = study_selection(self.mergefile, self.graph, study,
                                          self.stored_scores(states))
        if best is None:
            state.reasons = [state.selection.refused() or study.why()]
            return state
        winner = states[best.name]
        if winner.status != "fresh":  # selected after gc removed it: built back by make
            winner.status, winner.reasons = "stale", [f"selected by {spec.name}; removed by gc"]
            state.reasons = [f"selected {best.name}, which gc removed: rebuilt"]
            return state
        state.status, state.key = "fresh", winner.key
        state.digest, state.path = winner.digest, winner.path
        return state

    def study(self, spec: SearchSpec, states: dict[str, NodeState]) -> Study:
        """Replay ``spec``'s study from the store: each trial the store knows, built (or
        dropped by gc) and scored, is told its objective; it stops at the first trial that
        is not (planned stale, or with its evaluations pending). Builds and evaluates
        nothing."""
        scores = self.stored_scores(states)

        def outcome(trial: Trial) -> TrialOutcome | str:
            planned = self.trial_state(spec, trial, states)
            if planned.status not in ("fresh", "dropped"):
                return "; ".join(planned.reasons) or "not built"
            return judge_trial(self.mergefile, self.graph, spec, planned, scores) or \
                "not scored yet"

        return run_study(self.mergefile, spec, outcome)

    def trial_state(self, spec: SearchSpec, trial: Trial, states: dict[str, NodeState]
                    ) -> NodeState:
        """``trial``'s node registered with the graph and planned (once) into ``states``:
        a trial gc removed after it lost is ``dropped`` while its scores are kept."""
        if trial.name not in states:
            node = trial_spec(self.mergefile, spec, trial.point)
            register_trial(self.mergefile, self.graph, spec, node)
            states[trial.name] = self._plan_merge(node, states, False)
            self._mark_dropped_one(trial.name, states, self.stored_scores(states))
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
            sweeps = [ref for ref in pending if isinstance(self.mergefile.nodes[ref], SweepSpec)]
            state.reasons = [f"waits for {ref}'s selection" for ref in sweeps] + [
                r for r in reasons if not any(r.startswith(f"parent changed: {ref}")
                                              for ref in sweeps)]
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
            state.reasons = self._selection_changes(
                spec, states, previous, recipe_changes(previous.get("recipe") or {}, recipe,
                                                       parent_names(spec, method)))
        return state

    def _selection_changes(self, spec: MergeSpec, states: dict[str, NodeState],
                           previous: dict[str, Any], reasons: list[str]) -> list[str]:
        """``parent changed: blend`` said truly when ``blend`` is a sweep whose selected
        variant is another one than the last build used."""
        before = previous.get("selected") if isinstance(previous.get("selected"), dict) else {}
        out = []
        for reason in reasons:
            ref = reason.removeprefix("parent changed: ")
            selection = states[ref].selection if ref in states and ref != reason else None
            was = before.get(ref) if selection is not None else None
            if selection is not None and isinstance(was, str) and was != selection.winner:
                reason = f"selected variant changed: {was} → {selection.winner}"
            out.append(reason)
        return out

    def current(self, node: str) -> NodeState:
        """``node``'s planned state, which has a directory (a source available here, or a
        fresh build); StoreError otherwise."""
        self.register_trials([node])
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

    def live_keys(self, keep_variants: bool = False) -> set[str]:
        """The keys this Mergefile still reaches (see `reachable`)."""
        return self.reachable(keep_variants)[0]

    def reachable(self, keep_variants: bool = False) -> tuple[set[str], dict[str, str]]:
        """The keys this Mergefile still reaches: every merge node's current key (planned
        over all nodes), and the key each merge node still here was last built as (its ref),
        so editing a knob and running ``gc`` before ``make`` keeps the last build.

        A sweep with ``select:`` reaches its selected variant: the variants that lost are
        left out (their scores stay in the store) unless ``keep_variants``, or another node
        uses one directly; the second value says why for each of their keys. A sweep not
        yet resolved keeps every variant. A search is ruled the same way: its best trial is
        kept, the others (scores kept, replayed without a build) go, and an unfinished
        search keeps every trial.

        Raises:
            MergebuildError: a node cannot be planned (a source is missing, the hub is
                unreachable).
        """
        states = self.plan(list(self.mergefile.nodes))
        losers = {} if keep_variants else self._losers(states)
        keys = {s.key for s in states if s.kind == "merge" and s.key and s.name not in losers}
        for name, spec in self.mergefile.nodes.items():
            ref = self.refs.read(name)
            if isinstance(spec, MergeSpec) and ref and ref.get("key") and name not in losers:
                keys.add(str(ref["key"]))
        by_name = {s.name: s for s in states}
        why = {}
        for name, sweep in losers.items():
            ref = self.refs.read(name)
            for key in {by_name[name].key, ref.get("key") if ref else None} - {None} - keys:
                why[str(key)] = (f"{name} lost {sweep}'s selection (its scores are kept; "
                                 "gc --keep-variants keeps it)")
        return keys, why

    def _losers(self, states: list[NodeState]) -> dict[str, str]:
        """{variant: its sweep} of resolved selections' losers that no other node uses."""
        losers: dict[str, str] = {}
        for state in states:
            if state.kind not in ("sweep", "search") or state.selection is None \
                    or state.digest is None:
                continue
            spec = self.mergefile.nodes[state.name]
            variants = ([t.name for t in state.study.trials] if state.study is not None
                        else spec.variants)  # type: ignore[union-attr]
            for variant in variants:
                used = [c for c in self.graph.succ[variant] if c != state.name]
                if variant != state.selection.winner and not used:
                    losers[variant] = state.name
        # A loser whose recipe is a kept variant's (two points, one merge) is kept with it.
        kept = {s.key for s in states if s.kind == "merge" and s.name not in losers}
        return {v: sweep for v, sweep in losers.items()
                if next(s for s in states if s.name == v).key not in kept}


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


def judge_trial(mergefile: Mergefile, graph: Dag, spec: SearchSpec, state: NodeState,
                scores: Scores) -> TrialOutcome | None:
    """A built trial's objective under ``select:`` from ``scores`` (None: not all known),
    judged as a sweep's variant is (`judge`): one failing its checks is kept out of the
    ranking."""
    assert state.key is not None and state.digest is not None
    known = scores(state.name)
    if any(name not in known for name in required_evals(mergefile, graph, state.name)):
        return None
    judged = judge(mergefile, graph, spec.select, state.name, scores)
    if judged.value is None:
        return None
    return TrialOutcome(key=state.key, digest=state.digest, value=judged.value,
                        excluded=judged.failed)


def sweep_state(spec: SweepSpec, states: dict[str, NodeState]) -> NodeState:
    """A sweep is fresh when every variant is (or, dropped by gc, is known); it builds
    nothing of its own."""
    variants = [states[v] for v in spec.variants]
    stale = [v for v in variants if v.status not in ("fresh", "dropped")]
    keyed = [v.key for v in variants if v.key]
    state = NodeState(name=spec.name, kind="sweep", status="stale" if stale else "fresh",
                      method=f"sweep ({len(variants)} variants)")
    if stale:
        same = len(keyed) - len(set(keyed))
        state.reasons = [f"{len(stale)} of {len(variants)} variants to build"
                         + (f"; {same} give a recipe another variant gives (built once)"
                            if same else "")]
    return state
