"""The make loop: build each stale node in order under its key's lock, reuse what another
build or an early cutoff already made, publish into the store and record the node's ref.

The loop runs in the driver; the work under a key's lock (build, evaluate, publish) is a unit
handed to an executor (build/executors.py): in this process, or in workers, at once for
independent units."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergebuild import faults
from mergebuild.build.evaluation import Evaluations
from mergebuild.build.events import MakeResult, NodeResult, Reporter
from mergebuild.build.executors import Done, Executor, LocalExecutor, WorkUnit, replay
from mergebuild.build.job import assemble_job, check_before_fetch, parent_metadata, with_parents
from mergebuild.build.record import build_record, utc_now
from mergebuild.build.resources import (
    PROCESS_BASELINE_BYTES,
    MemoryBudget,
    UnitNeeds,
    estimate_peak_bytes,
)
from mergebuild.errors import (
    BuildInterrupted,
    CorruptParentError,
    MergebuildError,
    SourceError,
    StoreError,
)
from mergebuild.io.hashing import recipe_key
from mergebuild.methods.registry import METHODS, Method
from mergebuild.plan.lockfile import SourceLock
from mergebuild.plan.recipe import build_recipe, parent_names
from mergebuild.plan.staleness import NodeState, Planner, adapt
from mergebuild.sources.resolve import ResolvedSource, materialize, resolve_adapter, resolve_source
from mergebuild.spec.graph import Dag
from mergebuild.spec.model import (
    AdaptedSpec,
    Mergefile,
    MergeSpec,
    SearchSpec,
    SourceSpec,
    SweepSpec,
)
from mergebuild.store.objects import Store


@dataclass(frozen=True)
class Published:
    """What a unit did for one key: built and published it, or found it published by another
    mergebuild under the key's lock."""

    key: str
    digest: str
    path: Path
    built: bool
    bytes_written: int = 0
    seconds: float = 0.0


@dataclass
class NodeUnit:
    """One merge node's build: under its key's lock, look again, else build, evaluate (the
    build record includes the scores) and publish."""

    label: str
    mergefile: Mergefile
    graph: Dag
    store_root: Path
    states: dict[str, NodeState]  # the node and the parents its build reads
    key: str
    recipe: dict[str, Any]
    force: bool
    device: str | None
    allow_nonfinite: bool
    evaluates: bool
    known: dict[str, str] = field(default_factory=dict)  # node → digest, for its checks
    needs: UnitNeeds = field(default_factory=lambda: UnitNeeds(memory=0))

    def run(self, store: Store, reporter: Reporter, evaluations: Evaluations | None
            ) -> Published:
        spec = self.mergefile.nodes[self.label]
        assert isinstance(spec, MergeSpec)
        builder = Builder(self.mergefile, self.graph, store, self.allow_nonfinite)
        with store.lock(self.key, on_wait=lambda: reporter.waiting(spec.name)):
            found = None if self.force else store.lookup(self.key)
            if found:
                return Published(self.key, found.digest, found.path, built=False)
            t0 = time.monotonic()
            path, written, digest = builder.build(spec, METHODS[spec.method], self.states,
                                                  self.key, self.recipe, self.device,
                                                  reporter, evaluations)
        return Published(self.key, digest, path, built=True, bytes_written=written,
                         seconds=time.monotonic() - t0)

    def worker_evaluations(self, store: Store, reporter: Reporter) -> Evaluations | None:
        if not self.evaluates:
            return None
        return _evaluations_knowing(self.known, self.mergefile, self.graph, store, reporter,
                                    self.device)


def _evaluations_knowing(known: dict[str, str], mergefile: Mergefile, graph, store: Store,
                         reporter: Reporter, device: str | None) -> Evaluations:
    """A worker's evaluations, told the digests the driver already knows (node → digest)."""
    evaluations = Evaluations(mergefile, graph, store, reporter, device)
    for node, digest in known.items():
        evaluations.know(node, digest)
    return evaluations


@dataclass
class VariantsUnit:
    """A sweep's stale variants not found in the store, one pass over their shared parents:
    each key locked in key order and looked up again under its lock; the rest built."""

    label: str
    mergefile: Mergefile
    graph: Dag
    store_root: Path
    states: dict[str, NodeState]  # one variant per key, and their parents
    keys: list[tuple[str, str, dict[str, Any]]]  # (key, the variant built for it, recipe)
    force: bool
    device: str | None
    allow_nonfinite: bool
    needs: UnitNeeds = field(default_factory=lambda: UnitNeeds(memory=0))

    def run(self, store: Store, reporter: Reporter, evaluations: Evaluations | None
            ) -> list[Published]:
        builder = Builder(self.mergefile, self.graph, store, self.allow_nonfinite)
        done: dict[str, Published] = {}
        todo = []
        with contextlib.ExitStack() as locks:
            for key, name, recipe in sorted(self.keys):
                locks.enter_context(store.lock(key, on_wait=lambda name=name:
                                               reporter.waiting(name)))
                found = None if self.force else store.lookup(key)
                if found is not None:
                    done[key] = Published(key, found.digest, found.path, built=False)
                else:
                    spec = self.mergefile.nodes[name]
                    assert isinstance(spec, MergeSpec)
                    todo.append((spec, self.states[name], recipe))
            if todo:
                order = {key: i for i, (key, _, _) in enumerate(self.keys)}
                todo.sort(key=lambda item: order[item[1].key])  # the sweep's order
                t0 = time.monotonic()
                built = builder.build_variants(todo, self.states, self.device, reporter)
                seconds = time.monotonic() - t0
                for (_spec, state, _), (path, written, digest) in zip(todo, built,
                                                                       strict=True):
                    assert state.key is not None
                    done[state.key] = Published(state.key, digest, path, built=True,
                                                bytes_written=written, seconds=seconds)
        return [done[key] for key, _, _ in self.keys]

    def worker_evaluations(self, store: Store, reporter: Reporter) -> Evaluations | None:
        return None


@dataclass
class EvaluationUnit:
    """A model's pending evaluations outside a build: a scored source (generated or fetched
    where it runs), or a fresh or reused node scored on an eval it has not been yet."""

    label: str
    mergefile: Mergefile
    graph: Dag
    store_root: Path
    digest: str
    source: ResolvedSource | None  # a source's weights; else ``path``, a store object
    path: Path | None
    device: str | None
    known: dict[str, str] = field(default_factory=dict)
    needs: UnitNeeds = field(default_factory=lambda: UnitNeeds(memory=0))

    def run(self, store: Store, reporter: Reporter, evaluations: Evaluations | None) -> None:
        assert evaluations is not None
        directory = materialize(self.source, store) if self.source is not None else self.path
        evaluations.ensure(self.label, self.digest, directory)

    def worker_evaluations(self, store: Store, reporter: Reporter) -> Evaluations | None:
        return _evaluations_knowing(self.known, self.mergefile, self.graph, store, reporter,
                                    self.device)


@dataclass
class _Pending:
    """A handled node (or sweep group) whose unit has not finished: how to finish it."""

    unit: WorkUnit
    names: list[str]
    finish: Callable[[Any], list[NodeResult]]
    gated: bool  # a single node: its checks are judged once it is built (not a sweep group)
    fatal: bool = False  # its error ends the make even with --keep-going (a source's eval)
    group: list[NodeState] | None = None  # a sweep's variants: scored once built


@dataclass
class _Ticket:
    """A handled plan entry's results, reported once every earlier entry's are."""

    results: list[NodeResult] | None = None  # None: not settled yet
    events: tuple[Any, ...] = ()  # a remote unit's reporter events, replayed first
    # what the reporter is told: node_done of a NodeResult, or (method, arguments)
    reports: list[Any] = field(default_factory=list)
    replayed: bool = False
    sent: int = 0  # reports already told


class Maker:
    """Builds what a plan finds stale into ``store`` (a scratch store for ``make --check``).

    The caller holds the store's use lock; each key is built under its own lock.
    """

    def __init__(self, mergefile: Mergefile, graph: Dag, planner: Planner,
                 lock: SourceLock, store: Store) -> None:
        self.mergefile = mergefile
        self.graph = graph
        self.planner = planner
        self.lock = lock
        self.store = store
        self.allow_nonfinite = False
        self.refs = store.refs_of(mergefile.path)  # this Mergefile's records, nobody else's
        self._states: dict[str, NodeState] = {}  # the make's plan, by name

    def make(self, targets: list[str], *, force: bool = False, keep_going: bool = False,
             device: str | None = None, reporter: Reporter,
             allow_nonfinite: bool = False, executor: Executor | None = None) -> MakeResult:
        """Build every stale node the targets (default: every final node) need; reuse the rest.

        A node whose parents were rebuilt is looked up again with their new digests: when a
        parent's bytes did not change, the child is reused (early cutoff). ``executor``
        (default: this process, one node after another) runs the builds; results are
        reported in plan order whatever order they finish in.
        """
        started = time.monotonic()
        self.allow_nonfinite = allow_nonfinite
        targets = self.planner.targets_or_default(targets)
        self._import_torch_early(force)
        states = self.planner.plan(targets, force=force)
        reporter.plan(states)
        # A stale search builds its trials; a sweep is built as its variants (merges).
        to_build = sum(1 for s in states if s.kind in ("merge", "search") and s.status == "stale")
        if to_build:
            self.store.require_writable(f"cannot build {to_build} node{'s' * (to_build != 1)}")
        self.lock.update(states)
        self._states = {s.name: s for s in states}
        evaluations = (Evaluations(self.mergefile, self.graph, self.store, reporter, device)
                       if self.mergefile.evals else None)
        if evaluations is not None:
            evaluations.check_installed(states)
        run = _MakeRun(self, states, targets, force, keep_going, device, reporter,
                       evaluations, executor or LocalExecutor())
        results = run.loop()
        outcome = MakeResult(results=results, seconds=time.monotonic() - started,
                             evaluations_run=evaluations.runs if evaluations else 0)
        reporter.summary(outcome)
        return outcome

    def _score_variant(self, state: NodeState, result: NodeResult, evaluations: Evaluations,
                       ranked: bool) -> NodeResult:
        """A variant built in a sweep's pass: scored on the evals it needs (its selection's
        among them, each once per digest) and judged by its checks."""
        assert state.digest is not None
        evaluations.know(state.name, state.digest)
        evaluations.ensure(state.name, state.digest, state.path)
        return self._gate(state, result, evaluations, ranked)

    def _select(self, spec: SweepSpec, state: NodeState, states: dict[str, NodeState],
                device: str | None, reporter: Reporter, evaluations: Evaluations
                ) -> NodeResult | None:
        """Resolve the sweep's ``select:`` from its variants' scores: from here on the sweep
        is its selected variant (digest, key, directory) for its children. When no variant
        passed its checks, the sweep's failed result says so (naming the best failing one).
        """
        from mergebuild.errors import EvaluationError
        from mergebuild.plan.selection import choose

        selection = choose(self.mergefile, self.graph, spec.name, evaluations.scores)
        state.selection = selection
        refused = selection.refused()
        if refused is not None and selection.ranking[0].failed is not None:
            return NodeResult(spec.name, "failed", refused)
        if refused is not None:
            raise EvaluationError(
                refused, node=spec.name,
                hint="see 'mergebuild metrics " + spec.name + "' for what each variant scored")
        winner = states[selection.winner]
        if winner.status == "dropped":  # selected again after gc removed it: build it back
            variant = self.mergefile.nodes[winner.name]
            assert isinstance(variant, MergeSpec)
            winner.reasons = [f"selected by {spec.name}; removed by gc"]
            result = self._make_node(variant, winner, states, False, device, reporter)
            reporter.node_done(result)
        state.selection = selection
        state.digest, state.key, state.path = winner.digest, winner.key, winner.path
        state.status, state.reasons = "fresh", []
        evaluations.know(spec.name, winner.digest)  # children's retain checks read it
        reporter.selected(selection)
        return None


    def make_trial(self, spec: MergeSpec, state: NodeState, states: dict[str, NodeState],
                   force: bool, device: str | None, reporter: Reporter,
                   evaluations: Evaluations | None) -> NodeResult:
        """One trial of a search, built (and scored on its evals) like any merge node."""
        return self._make_node(spec, state, states, force, device, reporter, evaluations)

    def _make_node(self, spec: MergeSpec, state: NodeState, states: dict[str, NodeState],
                   force: bool, device: str | None, reporter: Reporter,
                   evaluations: Evaluations | None = None) -> NodeResult:
        """One merge node made here and now (a search's trial, a selected variant gc had
        removed): what the loop hands an executor, run in this process."""
        started = self._start_node(spec, state, states, force, device, evaluations,
                                   estimate=False)
        if isinstance(started, NodeResult):
            return started
        return started.finish(started.unit.run(self.store, reporter, evaluations))[0]

    def _evaluate_source(self, state: NodeState, evaluations: Evaluations) -> None:
        """Score a source on its pending evals (materialising it only then)."""
        assert state.digest is not None and state.source is not None
        evaluations.know(state.name, state.digest)
        if any(t.status == "pending" for t in state.evaluations):
            directory = materialize(state.source, self.store)
            evaluations.ensure(state.name, state.digest, directory)

    def _gate(self, state: NodeState, result: NodeResult, evaluations: Evaluations,
              ranked: bool = False) -> NodeResult:
        """Score a node that is up to date (its pending evals only) and judge its checks; a
        failed check fails the node: its build stays in the store, its children wait. A
        ``ranked`` variant (its sweep selects) only carries its verdicts: its sweep's
        selection keeps it out of the ranking (see plan/selection.judge)."""
        assert state.digest is not None
        evaluations.know(state.name, state.digest)
        if result.outcome != "built":
            pending = any(t.status == "pending" for t in state.evaluations)
            evaluations.ensure(state.name, state.digest, state.path if pending else None)
        checks = evaluations.checks(state.name)
        result = dataclasses.replace(result, checks=checks)
        failures = result.failed_checks
        if failures and not ranked:
            return dataclasses.replace(
                result, outcome="failed",
                detail=f"{len(failures)} check{'s' * (len(failures) != 1)} failed")
        return result


    def _import_torch_early(self, force: bool) -> None:
        """Import torch on a thread while the plan hashes sources, when a merge node has never
        been built here (so something will be): the import (~2 s) then overlaps the hashing
        (~1 s for a 2.4 GB fresh store). A no-op make never imports torch."""
        merges = [n for n, s in self.mergefile.nodes.items() if isinstance(s, MergeSpec)]
        if not (force or any(self.refs.read(n) is None for n in merges)):
            return

        def load() -> None:
            with contextlib.suppress(BaseException):  # the engine's own import reports it
                importlib.import_module("torch")

        threading.Thread(target=load, name="import-torch", daemon=True).start()

    # one merge node ----------------------------------------------------------------------
    def _start_node(self, spec: MergeSpec, state: NodeState, states: dict[str, NodeState],
                    force: bool, device: str | None, evaluations: Evaluations | None,
                    estimate: bool) -> NodeResult | _Pending:
        """A fresh node, or one an early cutoff finds in the store, at once; else the unit
        that builds it."""
        method = METHODS[spec.method]
        if state.status == "fresh":
            self._record(spec, method, state)  # a no-op unless a make died before its ref
            return NodeResult(spec.name, "fresh", path=state.path)
        recipe = build_recipe(spec, method, lambda ref: states[ref].digest,  # type: ignore[arg-type,return-value]
                              self.mergefile.defaults)
        key = recipe_key(recipe)
        state.key, state.recipe = key, recipe
        found = None if force else self.store.lookup(key)
        if found:
            state.status, state.digest, state.path = "fresh", found.digest, found.path
            self._record(spec, method, state)
            return NodeResult(spec.name, "reused",
                              "parents rebuilt with identical output (early cutoff)",
                              path=found.path)
        reads = self._reads(spec, states)
        unit = NodeUnit(
            label=spec.name, mergefile=self.mergefile, graph=self.graph,
            store_root=self.store.root, states=reads, key=key, recipe=recipe, force=force,
            device=device, allow_nonfinite=self.allow_nonfinite,
            evaluates=evaluations is not None,
            known=evaluations.known() if evaluations is not None else {},
            needs=self._needs(spec, reads, 1, device) if estimate else UnitNeeds(memory=0))

        def finish(published: Published) -> list[NodeResult]:
            state.status, state.digest, state.path = "fresh", published.digest, published.path
            if not published.built:
                self._record(spec, method, state)
                return [NodeResult(spec.name, "reused", "built by another mergebuild",
                                   path=published.path)]
            faults.point("project.before_ref")
            self._record(spec, method, state)
            faults.point("project.node_done")
            return [NodeResult(spec.name, "built", "; ".join(state.reasons),
                               seconds=published.seconds,
                               bytes_written=published.bytes_written, path=published.path)]

        return _Pending(unit, [spec.name], finish, gated=True)

    # a sweep's stale variants ------------------------------------------------------------
    def _start_variants(self, group: list[NodeState], states: dict[str, NodeState],
                        force: bool, device: str | None, estimate: bool
                        ) -> list[NodeResult] | _Pending:
        """A sweep's stale variants: those already in the store (built before, or by another
        mergebuild) reused at once; variants whose recipes are identical (two points meaning
        the same merge) built once; the rest one unit, one pass over the shared parents."""
        results: dict[str, NodeResult] = {}
        todo: dict[str, list[tuple[MergeSpec, NodeState, dict[str, Any]]]] = {}
        for state in group:
            spec = self.mergefile.nodes[state.name]
            assert isinstance(spec, MergeSpec)
            recipe = build_recipe(spec, METHODS[spec.method],
                                  lambda ref: states[ref].digest,  # type: ignore[arg-type,return-value]
                                  self.mergefile.defaults)
            key = recipe_key(recipe)
            state.key, state.recipe = key, recipe
            todo.setdefault(key, []).append((spec, state, recipe))
        for key in sorted(todo):
            found = None if force else self.store.lookup(key)
            if found is not None:
                self._reuse(todo.pop(key), found.digest, found.path, results)
        if not todo:
            return [results[s.name] for s in group]
        lead = todo[next(iter(todo))][0][0]
        reads = self._reads(lead, states)
        for same in todo.values():
            reads[same[0][0].name] = same[0][1]
        unit = VariantsUnit(
            label=f"{len(todo)} variant(s) of {lead.name.split('[', 1)[0]}",
            mergefile=self.mergefile, graph=self.graph, store_root=self.store.root,
            states=reads, keys=[(key, same[0][0].name, same[0][2]) for key, same in todo.items()],
            force=force, device=device, allow_nonfinite=self.allow_nonfinite,
            needs=self._needs(lead, reads, len(todo), device) if estimate
            else UnitNeeds(memory=0))

        def finish(published: list[Published]) -> list[NodeResult]:
            built = sum(p.built for p in published)
            for same, done in zip(todo.values(), published, strict=True):
                if not done.built:
                    self._reuse(same, done.digest, done.path, results)
                    continue
                first = same[0][0].name
                for k, (spec, state, _) in enumerate(same):
                    state.status, state.path, state.digest = "fresh", done.path, done.digest
                    self._record(spec, METHODS[spec.method], state)
                    results[spec.name] = (
                        NodeResult(spec.name, "built",
                                   f"{'; '.join(state.reasons)}; one pass with "
                                   f"{built} variant(s)", seconds=done.seconds,
                                   bytes_written=done.bytes_written, path=done.path)
                        if k == 0 else
                        NodeResult(spec.name, "reused", f"the same recipe as {first}",
                                   path=done.path))
            return [results[s.name] for s in group]

        return _Pending(unit, [s.name for s in group], finish, gated=False)

    def _reuse(self, same: list[tuple[MergeSpec, NodeState, dict[str, Any]]], digest: str,
               path: Path, results: dict[str, NodeResult]) -> None:
        for spec, state, _ in same:
            state.status, state.digest, state.path = "fresh", digest, path
            self._record(spec, METHODS[spec.method], state)
            results[spec.name] = NodeResult(spec.name, "reused", "already built (same recipe)",
                                            path=path)

    def _reads(self, spec: MergeSpec, states: dict[str, NodeState]) -> dict[str, NodeState]:
        """The states a build of ``spec`` reads: its own, its parents', the merge under each
        adapted parent and the variant each sweep or search parent chose."""
        reads = {spec.name: states[spec.name]}
        for ref in spec.parent_refs():
            reads[ref] = states[ref]
            node = self.mergefile.nodes[ref]
            if isinstance(node, AdaptedSpec):
                reads[node.model] = states[node.model]
            selection = states[ref].selection
            if selection is not None:  # a sweep or search: the variant it chose
                reads[selection.winner] = states[selection.winner]
        return reads

    def _needs(self, spec: MergeSpec, states: dict[str, NodeState], variants: int,
               device: str | None) -> UnitNeeds:
        """The unit's peak memory, estimated from its parents' headers (sources generated or
        read from disk here, hub parents' headers by range requests); a parent whose headers
        cannot be read is left out (its build will say why)."""
        try:
            metadata = parent_metadata(self.mergefile, spec, states, self.store)
        except MergebuildError:
            metadata = {}
        wanted = device or self.mergefile.defaults.device
        return UnitNeeds(memory=estimate_peak_bytes({r: m.tensors for r, m in metadata.items()},
                                                    variants),
                         gpu=wanted != "cpu")

    def _record(self, spec: MergeSpec, method: Method, state: NodeState) -> None:
        previous = self.refs.read(spec.name)
        if previous and previous.get("key") == state.key and self.refs.migrated(spec.name):
            return
        selected = {ref: self._states[ref].selection.winner  # type: ignore[union-attr]
                    for ref in spec.parent_refs()
                    if ref in self._states and self._states[ref].selection is not None}
        self.refs.write(spec.name, {
            "key": state.key, "digest": state.digest, "recipe": state.recipe,
            "parents": parent_names(spec, method),
            **({"selected": selected} if selected else {}),
        })


class _MakeRun:
    """One make's loop: plan entries handled in order as soon as what they depend on is
    settled, units handed to the executor as slots (and memory) allow, results reported in
    plan order. With the local executor a unit finishes as it is submitted, so this is
    exactly the serial loop."""

    def __init__(self, maker: Maker, states: list[NodeState], targets: list[str], force: bool,
                 keep_going: bool, device: str | None, reporter: Reporter,
                 evaluations: Evaluations | None, executor: Executor) -> None:
        self.maker, self.mergefile = maker, maker.mergefile
        self.states = states
        self.by_name = {s.name: s for s in states}
        self.targets, self.force, self.keep_going = targets, force, keep_going
        self.device, self.reporter, self.evaluations = device, reporter, evaluations
        self.executor = executor
        self.budget = (MemoryBudget.of_this_machine() if executor.limits_memory
                       else MemoryBudget(None))
        self.failed: set[str] = set()
        self.settled: set[str] = set()  # variants built with the rest of their sweep
        self.sweep_of = {v: n for n, node in self.mergefile.nodes.items()
                         if isinstance(node, SweepSpec) for v in node.variants}
        # one per plan entry, in plan order: results are reported in that order
        self.tickets = [_Ticket() for _ in states]
        self.entry = {s.name: i for i, s in enumerate(states)}
        self.reported = 0
        self.queue: list[tuple[int, _Pending]] = []  # units waiting for a slot
        self.running: dict[int, _Pending] = {}
        self.busy: set[str] = set()  # nodes whose unit is queued or running
        self.stopped = False  # a failure without --keep-going: start nothing more
        self.error: MergebuildError | None = None
        self.told_memory = False

    # the loop ----------------------------------------------------------------------------
    def loop(self) -> list[NodeResult]:
        waiting = list(self.states)
        unhandled = {s.name for s in waiting}
        try:
            while True:
                for state in list(waiting):
                    if self.stopped:
                        break
                    if self._blocked(state, unhandled):
                        continue
                    self._take(state, waiting, unhandled)
                if self.stopped:
                    self.queue.clear()
                if not self.running:
                    if self.queue:  # a unit alone always fits
                        self._dispatch()
                        continue
                    if waiting and not self.stopped:
                        # Blocked on nothing that runs: the plan's order is the serial
                        # loop's, so handle the next entry as it would.
                        self._take(waiting[0], waiting, unhandled)
                        continue
                    break
                self._collect(self.executor.wait())
        except KeyboardInterrupt:
            self._interrupted()
            raise
        for entry, ticket in enumerate(self.tickets):  # entries a failure left unhandled
            if ticket.results is None:
                self._resolve(entry, [])
        if self.error is not None:
            raise self.error
        return [r for t in self.tickets for r in t.results or ()]

    def _take(self, state: NodeState, waiting: list[NodeState], unhandled: set[str]
              ) -> None:
        """Handle a plan entry, then start what the executor has room for."""
        waiting.remove(state)
        unhandled.discard(state.name)
        self._handle(state)
        if self.tickets[self.entry[state.name]].results is None and not any(
                state.name in p.names for p in self._pending()):
            self._resolve(self.entry[state.name], [])  # nothing to report
        self._dispatch()

    def _pending(self) -> list[_Pending]:
        return [p for _, p in self.queue] + list(self.running.values())

    def _interrupted(self) -> None:
        """Ctrl-C or SIGTERM with units running elsewhere: stop them (each turns it into
        BuildInterrupted and removes its temp dir) and wait for them, so nothing is left
        being written behind our back."""
        if not self.running:
            return
        with contextlib.suppress(BaseException):
            self.executor.interrupt()
            self.executor.close()
        raise BuildInterrupted(f"interrupted; the {len(self.running)} build(s) running were "
                               "stopped (a build is published whole or not at all)",
                               hint="run make again to finish")

    def _blocked(self, state: NodeState, unhandled: set[str]) -> bool:
        spec = self.mergefile.nodes.get(state.name)
        if isinstance(spec, SweepSpec):
            needs = list(spec.variants)
        elif isinstance(spec, SearchSpec):
            needs = spec.template.parent_refs()
        elif isinstance(spec, AdaptedSpec):
            needs = [spec.model]
        elif isinstance(spec, MergeSpec):
            needs = spec.parent_refs()
        else:
            return False
        return any(n in self.busy or n in unhandled for n in needs)

    # handling a plan entry ---------------------------------------------------------------
    def _handle(self, state: NodeState) -> None:
        maker, evaluations = self.maker, self.evaluations
        if state.kind == "source":
            if evaluations is None:
                return
            if self.executor.remote and any(t.status == "pending" for t in state.evaluations):
                assert state.digest is not None
                evaluations.know(state.name, state.digest)
                self.busy.add(state.name)
                self.queue.append((self.entry[state.name], _Pending(
                    self._evaluation(state, state.source, None), [state.name],
                    lambda _: [], gated=False, fatal=True)))
                return
            self._guarded(lambda: maker._evaluate_source(state, evaluations))
            return
        if (state.name in self.settled
                or self.maker.graph.nodes[state.name].get("trial_of") in self.by_name):
            return  # a search's trials are built by its study, in its order
        if state.status == "dropped":  # lost its sweep's selection; its scores are known
            if evaluations is not None:
                evaluations.know(state.name, state.digest)
            return
        spec = self.mergefile.nodes[state.name]
        if isinstance(spec, SearchSpec):
            self._search(state, spec)
            return
        if isinstance(spec, SweepSpec):
            lost = [v for v in spec.variants if v in self.failed]
            if lost:
                self.failed.add(state.name)
                self._resolve(self.entry[state.name], [NodeResult(state.name, "skipped",
                                                          f"variant '{lost[0]}' failed")])
            elif spec.select is not None and evaluations is not None:
                try:
                    refused = maker._select(spec, state, self.by_name, self.device,
                                            self.reporter, evaluations)
                except MergebuildError as exc:
                    self._failed(self.entry[state.name], [state.name], exc)
                    return
                if refused is not None:  # no variant passed its checks
                    self._settle(self.entry[state.name], [refused])
            else:
                state.status = "fresh"
            return
        if isinstance(spec, AdaptedSpec):
            if spec.model in self.failed:
                self.failed.add(state.name)
                self._resolve(self.entry[state.name], [NodeResult(state.name, "skipped",
                                                          f"parent '{spec.model}' failed")])
            else:  # its merge is built now: the identity children's keys use
                adapt(state, spec, self.by_name[spec.model])
            return
        assert isinstance(spec, MergeSpec)
        blocked = [r for r in spec.parent_refs() if r in self.failed]
        if blocked:
            self.failed.add(state.name)
            self._resolve(self.entry[state.name], [NodeResult(state.name, "skipped",
                                                      f"parent '{blocked[0]}' failed")])
            return
        sweep = self.sweep_of.get(state.name)
        forced = self.force and (state.name in self.targets or sweep in self.targets)
        estimate = self.executor.remote
        if sweep is not None and state.status != "fresh":
            # Every stale variant of the sweep at once: they share their parents.
            group = [self.by_name[v] for v in self.mergefile.nodes[sweep].variants  # type: ignore[union-attr]
                     if v in self.by_name and self.by_name[v].status != "fresh"]
            self.settled.update(s.name for s in group)
            names = [s.name for s in group]
            self._start(state, lambda: maker._start_variants(group, self.by_name, forced,
                                                             self.device, estimate),
                        names, gated=False, group=group)
            return
        self._start(state, lambda: maker._start_node(spec, state, self.by_name, forced,
                                                     self.device, evaluations, estimate),
                    [state.name], gated=True)

    def _search(self, state: NodeState, spec: SearchSpec) -> None:
        """A search's study, here and now: one trial at a time, each built in this process
        (the study asks for the next from the scores of those before it)."""
        from mergebuild.build.search import make_search

        ticket = self.entry[state.name]
        blocked = [r for r in spec.template.parent_refs() if r in self.failed]
        try:
            if blocked:
                raise MergebuildError(f"parent '{blocked[0]}' failed", node=spec.name)
            found = make_search(self.maker, spec, state, self.by_name,
                                force=self.force and state.name in self.targets,
                                device=self.device, reporter=self.reporter,
                                evaluations=self.evaluations)  # type: ignore[arg-type]
        except MergebuildError as exc:
            if not self.keep_going:
                self.failed.add(state.name)
                self.stopped = True
                self.error = self.error or exc
                self._resolve(ticket, [])
                return
            found = [NodeResult(state.name, "skipped" if blocked else "failed", exc.message)]
        if found[-1].outcome in ("failed", "skipped"):
            self.failed.add(state.name)
            if not self.keep_going:
                self.stopped = True
        self._resolve(ticket, found,
                      reports=[found[-1]] if found[-1].outcome != "fresh" else [])

    def _start(self, state: NodeState,
               start: Callable[[], list[NodeResult] | NodeResult | _Pending],
               names: list[str], gated: bool, group: list[NodeState] | None = None
               ) -> None:
        """Run a node's (or group's) driver side; queue its unit, or settle it at once."""
        ticket = self.entry[state.name]
        try:
            started = start()
        except MergebuildError as exc:
            self._failed(ticket, names, exc)
            return
        if isinstance(started, _Pending):
            started.group = group
            self.busy.update(started.names)
            self.queue.append((ticket, started))
            return
        results = started if isinstance(started, list) else [started]
        if (gated and self.executor.remote and self.evaluations is not None
                and results[0].outcome != "failed"
                and any(t.status == "pending" for t in state.evaluations)):
            # Up to date but not yet scored on everything: the scoring is a unit too.
            assert state.digest is not None
            self.busy.update(names)
            self.queue.append((ticket, _Pending(
                self._evaluation(state, None, state.path), names,
                lambda _: results, gated=True)))
            return
        self._settle(ticket, results, gated=gated, group=group)

    def _evaluation(self, state: NodeState, source: ResolvedSource | None,
                    path: Path | None) -> EvaluationUnit:
        assert state.digest is not None and self.evaluations is not None
        return EvaluationUnit(
            label=state.name, mergefile=self.mergefile, graph=self.maker.graph,
            store_root=self.maker.store.root, digest=state.digest, source=source, path=path,
            device=self.device, known=self.evaluations.known(),
            needs=UnitNeeds(memory=PROCESS_BASELINE_BYTES))

    def _settle(self, ticket: int, results: list[NodeResult], events: tuple[Any, ...] = (),
                gated: bool = False, group: list[NodeState] | None = None) -> None:
        """A node's (or a sweep group's) results; a single node's checks judged; a group's
        variants scored and judged once all of them are reported."""
        reports: list[Any] | None = None  # default: every result that is not fresh
        if gated and self.evaluations is not None:
            state = self.by_name[results[0].name]
            evaluations = self.evaluations
            try:
                results = [self.maker._gate(state, results[0], evaluations,
                                            self._ranked(state.name))]
            except MergebuildError as exc:
                self._failed(ticket, [state.name], exc, events)
                return
            result = results[0]
            reports = [] if result.outcome == "fresh" else [result]
            if result.outcome not in ("fresh", "failed") and result.failed_checks:
                sweep = self.sweep_of.get(state.name)
                reports.append(("excluded", (state.name, sweep or state.name, result.checks)))
        later: list[Any] = []  # told after the group's results: failed scoring, exclusions
        if group is not None and self.evaluations is not None:
            self._report(ticket, results, events)
            scored = []
            for variant, result in zip(group, results, strict=True):
                if result.outcome != "failed":
                    try:
                        result = self.maker._score_variant(variant, result, self.evaluations,
                                                           self._ranked(variant.name))
                    except MergebuildError as exc:
                        if not self.keep_going:
                            self.failed.add(variant.name)
                            self.stopped = True
                            self.error = self.error or exc
                            self._resolve(ticket, [], reports=[])
                            return
                        result = NodeResult(variant.name, "failed", str(exc))
                    if result.outcome == "failed":  # its checks, or its evaluation
                        later.append(result)
                    elif result.failed_checks:
                        later.append(("excluded", (variant.name, self.sweep_of[variant.name],
                                                   result.checks)))
                scored.append(result)
            results = scored
        for result in results:
            if result.outcome == "failed":
                self.failed.add(result.name)
                if not self.keep_going:
                    self.stopped = True
        if group is not None and self.evaluations is not None:
            self._resolve(ticket, results, reports=later)
        else:
            self._resolve(ticket, results, events, reports)

    def _ranked(self, name: str) -> bool:
        """A variant ranked by its sweep's select: failing its checks keeps it out of the
        ranking (reported), it does not fail: the sweep selects the best that passes."""
        sweep = self.sweep_of.get(name)
        return sweep is not None and self.mergefile.nodes[sweep].select is not None  # type: ignore[union-attr]

    def _failed(self, ticket: int, names: list[str], exc: MergebuildError,
                events: tuple[Any, ...] = ()) -> None:
        self.failed.update(names)
        if not self.keep_going:
            self.stopped = True
            self.error = self.error or exc
            self._resolve(ticket, [], events)
            return
        self._resolve(ticket, [NodeResult(n, "failed", str(exc)) for n in names], events)

    def _guarded(self, work: Callable[[], None]) -> None:
        """Driver-side work outside any node's result (a source's evaluation): its error
        ends the make, as it always has, once the running units have finished."""
        try:
            work()
        except MergebuildError as exc:
            self.stopped = True
            self.error = self.error or exc

    # units -------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Hand queued units to the executor, in plan order, while slots and memory allow;
        the local executor runs each as it is handed over."""
        while self.queue and not self.stopped and len(self.running) < self.executor.slots:
            ticket, pending = self.queue[0]
            needs = pending.unit.needs.memory
            if self.executor.limits_memory and not self.budget.fits(needs):
                self._tell_memory(needs)
                return
            self.queue.pop(0)
            self.budget.take(ticket, needs)
            self.running[ticket] = pending
            self.executor.submit(ticket, pending.unit, self.maker.store, self.reporter,
                                 self.evaluations)
            if not self.executor.remote:
                self._collect(self.executor.wait())

    def _tell_memory(self, needs: int) -> None:
        if self.told_memory:
            return
        self.told_memory = True
        assert self.budget.total is not None
        self.reporter.note(
            f"running {len(self.running)} build(s) at once, not {self.executor.slots}: the "
            f"next needs about {needs / 2**30:.1f} GiB of memory and "
            f"{self.budget.total / 2**30:.1f} GiB is available to builds")

    def _collect(self, finished: list[Done]) -> None:
        for done in finished:
            pending = self.running.pop(done.ticket)
            self.budget.give_back(done.ticket)
            self.busy.difference_update(pending.names)
            if self.evaluations is not None:
                self.evaluations.runs += done.evaluations_run
            if done.error is not None and pending.fatal:
                self.stopped = True
                self.error = self.error or done.error
                self._resolve(done.ticket, [], done.events)
            elif done.error is not None:
                self._failed(done.ticket, pending.names, done.error, done.events)
            else:
                try:
                    results = pending.finish(done.outcome)
                except MergebuildError as exc:
                    self._failed(done.ticket, pending.names, exc, done.events)
                else:
                    self._settle(done.ticket, results, done.events, pending.gated,
                                 pending.group)
            for name in pending.names:  # a sweep's other variants: reported with the first
                if self.tickets[self.entry[name]].results is None:
                    self._resolve(self.entry[name], [])

    # reporting in plan order -------------------------------------------------------------
    def _report(self, ticket: int, reports: list[NodeResult], events: tuple[Any, ...] = ()
                ) -> None:
        """Tell ``reports`` of an entry not settled yet, as soon as it is its turn."""
        entry = self.tickets[ticket]
        entry.events = entry.events or events
        entry.reports.extend(r for r in reports if r.outcome != "fresh")
        self._flush()

    def _resolve(self, ticket: int, results: list[NodeResult], events: tuple[Any, ...] = (),
                 reports: list[Any] | None = None) -> None:
        """Settle an entry: its results, and what node_done is told of them (by default each
        that is not fresh)."""
        entry = self.tickets[ticket]
        entry.results = results
        entry.events = entry.events or events
        entry.reports.extend([r for r in results if r.outcome != "fresh"]
                             if reports is None else reports)
        self._flush()

    def _flush(self) -> None:
        """Report, in plan order, every entry whose turn it is."""
        while self.reported < len(self.tickets):
            entry = self.tickets[self.reported]
            if not entry.replayed and (entry.events or entry.reports
                                       or entry.results is not None):
                replay(entry.events, self.reporter)
                entry.replayed = True
            for report in entry.reports[entry.sent:]:
                if isinstance(report, NodeResult):
                    self.reporter.node_done(report)
                else:  # (a Reporter method, its arguments)
                    getattr(self.reporter, report[0])(*report[1])
            entry.sent = len(entry.reports)
            if entry.results is None:
                return
            self.reported += 1


class Builder:
    """The work under a key's lock, wherever it runs: assemble the job, check and fetch the
    parents, build into ``tmp/``, write provenance, publish."""

    def __init__(self, mergefile: Mergefile, graph: Dag, store: Store,
                 allow_nonfinite: bool = False) -> None:
        self.mergefile = mergefile
        self.graph = graph
        self.store = store
        self.allow_nonfinite = allow_nonfinite

    def build_variants(self, todo: list[tuple[MergeSpec, NodeState, dict[str, Any]]],
                       states: dict[str, NodeState], device: str | None,
                       reporter: Reporter) -> list[tuple[Path, int, str]]:
        """Build variants over the same parents in one pass; publish each: its directory,
        bytes written and digest."""
        from mergebuild.build.engine import run_builds
        from mergebuild.provenance.write import write_provenance

        jobs = []
        for spec, state, _ in todo:
            job = assemble_job(self.mergefile, spec, METHODS[spec.method], state.key, device)  # type: ignore[arg-type]
            check_before_fetch(job, self.mergefile, spec, states, self.store)
            jobs.append(with_parents(job, self.mergefile, spec, states, self.store,
                                     reporter.download))
        # The variants share their parents: each store-object parent is hashed once in the
        # pass, against what the store published for it.
        parent_keys = self._store_parents(todo[0][0], states)
        published_parents = self._published(todo[0][0], parent_keys, states)
        jobs = [replace(job, published=published_parents) for job in jobs]
        lead = todo[0][1]
        label = f"{len(todo)} variant(s) of {lead.name.split('[', 1)[0]} in one pass"
        reporter.node_start(NodeState(name=label, kind="merge", status="stale",
                                      method=lead.method))
        tmps = [self.store.new_tmp(state.key) for _, state, _ in todo]  # type: ignore[arg-type]
        published: list[tuple[Path, int, str]] = []
        started = utc_now()
        try:
            outputs = run_builds(jobs, tmps,
                                 progress=lambda *a: reporter.node_progress(label, *a))
            self._check_sources_unchanged(todo[0][0], states)
            for (spec, state, recipe), output, tmp in zip(todo, outputs, tmps, strict=True):
                state.digest = output.digest
                record = build_record(self.mergefile, self.graph, spec, METHODS[spec.method],
                                      states, state.key, recipe, output, started)  # type: ignore[arg-type]
                write_provenance(tmp, record)
                published.append((self.store.publish(tmp, state.key, output.digest,  # type: ignore[arg-type]
                                                     output.xxh128), output.bytes_written,
                                  output.digest))
        except CorruptParentError as exc:
            for tmp in tmps[len(published):]:
                self.store.abandon(tmp)
            self.store.quarantine(parent_keys[exc.parent])
            raise
        except KeyboardInterrupt:
            for tmp in tmps[len(published):]:
                self.store.abandon(tmp)
            raise BuildInterrupted(f"interrupted; {len(published)} of {len(todo)} variants "
                                   "published", node=lead.name,
                                   hint="run make again to finish") from None
        except OSError as exc:
            for tmp in tmps[len(published):]:
                self.store.abandon(tmp)
            raise self.store.os_error(exc, "build failed", node=lead.name) from None
        except BaseException:
            for tmp in tmps[len(published):]:
                self.store.abandon(tmp)
            raise
        return published

    def build(self, spec: MergeSpec, method: Method, states: dict[str, NodeState], key: str,
              recipe: dict[str, Any], device: str | None, reporter: Reporter,
              evaluations: Evaluations | None = None) -> tuple[Path, int, str]:
        """Build ``spec`` and publish it: its directory, bytes written and digest."""
        from mergebuild.build.engine import run_build
        from mergebuild.provenance.write import write_provenance

        state = states[spec.name]
        job = assemble_job(self.mergefile, spec, method, key, device, self.allow_nonfinite)
        # An incompatible recipe fails here, in seconds, before any weights are downloaded.
        check_before_fetch(job, self.mergefile, spec, states, self.store)
        job = with_parents(job, self.mergefile, spec, states, self.store, reporter.download)
        parent_keys = self._store_parents(spec, states)
        job = replace(job, published=self._published(spec, parent_keys, states))
        reporter.node_start(state)
        tmp = self.store.new_tmp(key)
        started = utc_now()
        try:
            output = run_build(job, tmp, progress=lambda *a: reporter.node_progress(spec.name, *a))
            self._check_sources_unchanged(spec, states)
            state.digest = output.digest
            record = build_record(self.mergefile, self.graph, spec, method, states, key,
                                  recipe, output, started)
            if evaluations is not None:
                # Evals declared now are part of the published object: the card's
                # model-index and the test-result attestation, both under provenance.
                evaluations.ensure(spec.name, output.digest, tmp)
                summary = evaluations.summary(spec.name, evaluations.checks(spec.name))
                record = dataclasses.replace(record, evaluation=summary)
            write_provenance(tmp, record)
            path = self.store.publish(tmp, key, output.digest, output.xxh128)
        except CorruptParentError as exc:
            self.store.abandon(tmp)
            self.store.quarantine(parent_keys[exc.parent])
            raise
        except KeyboardInterrupt:
            self.store.abandon(tmp)
            done = "its complete build was published" if self.store.object_dir(key).exists() \
                else "nothing was published"
            raise BuildInterrupted(f"interrupted; {done}", node=spec.name,
                                   hint="run make again to finish") from None
        except OSError as exc:
            self.store.abandon(tmp)
            raise self.store.os_error(exc, "build failed", node=spec.name) from None
        except BaseException:
            self.store.abandon(tmp)
            raise
        return path, output.bytes_written, output.digest

    def _store_parents(self, spec: MergeSpec, states: dict[str, NodeState]) -> dict[str, str]:
        """Each parent read from a store object (a merge, or a merge read through a LoRA)
        → that object's key."""
        keys = {}
        for ref in spec.parent_refs():
            node = self.mergefile.nodes[ref]
            built = states[node.model] if isinstance(node, AdaptedSpec) else states[ref]
            if built.kind in ("merge", "sweep", "search") and built.key is not None:
                keys[ref] = built.key
        return keys

    def _published(self, spec: MergeSpec, parent_keys: dict[str, str],
                   states: dict[str, NodeState]) -> dict[str, dict[str, str]]:
        """What the store published for each store-object parent, by file: the bytes the
        build reads must hash to it. A parent without a matching record is moved aside."""
        published = {}
        for ref, key in parent_keys.items():
            node = self.mergefile.nodes[ref]
            built = states[node.model] if isinstance(node, AdaptedSpec) else states[ref]
            record = self.store.read_published(key)
            if record is None or record.digest != built.digest:
                self.store.quarantine(key)
                raise StoreError(f"parent '{ref}' is not what the store published",
                                 node=spec.name,
                                 hint="it was moved aside; run make again to rebuild it")
            published[ref] = {name: xxh for name, (_size, xxh) in record.files.items()}
        return published

    def _check_sources_unchanged(self, spec: MergeSpec, states: dict[str, NodeState]) -> None:
        """A local parent edited after planning (even before the engine opened it) must not be
        recorded under the digest it had when planned. Stat-cache cheap when nothing changed."""
        for ref in spec.parent_refs():
            planned = states[ref].source
            node = self.mergefile.nodes[ref]
            if isinstance(node, AdaptedSpec):
                adapter = states[ref].adapter
                if adapter is not None and adapter.kind == "local" and resolve_adapter(
                        node.adapter, ref, self.store).digest != adapter.digest:
                    raise SourceError(f"the LoRA adapter of '{ref}' changed on disk during the "
                                      "build", node=spec.name,
                                      hint="run make again once nothing is writing the adapter")
                continue
            if planned is None or planned.kind != "local" or not isinstance(node, SourceSpec):
                continue
            if resolve_source(node, self.store).digest != planned.digest:
                raise SourceError(f"the weights of '{ref}' changed on disk during the build",
                                  node=spec.name,
                                  hint="run make again once nothing is writing the parent")
