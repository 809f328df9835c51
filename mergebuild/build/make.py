"""The make loop: build each stale node in order under its key's lock, reuse what another
build or an early cutoff already made, publish into the store and record the node's ref."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from mergebuild import faults
from mergebuild.build.evaluation import Evaluations
from mergebuild.build.events import MakeResult, NodeResult, Reporter
from mergebuild.build.job import assemble_job, check_before_fetch, with_parents
from mergebuild.build.record import build_record, utc_now
from mergebuild.build.search import make_search
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
from mergebuild.sources.resolve import materialize, resolve_adapter, resolve_source
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
             allow_nonfinite: bool = False) -> MakeResult:
        """Build every stale node the targets (default: every final node) need; reuse the rest.

        A node whose parents were rebuilt is looked up again with their new digests: when a
        parent's bytes did not change, the child is reused (early cutoff).
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
        by_name = {s.name: s for s in states}
        self._states = by_name
        evaluations = (Evaluations(self.mergefile, self.graph, self.store, reporter, device)
                       if self.mergefile.evals else None)
        if evaluations is not None:
            evaluations.check_installed(states)
        results: list[NodeResult] = []
        failed: set[str] = set()
        sweep_of = {v: n for n, node in self.mergefile.nodes.items()
                    if isinstance(node, SweepSpec) for v in node.variants}
        settled: set[str] = set()  # variants built with the rest of their sweep
        for state in states:
            if state.kind == "source":
                if evaluations is not None:
                    self._evaluate_source(state, evaluations)
                continue
            if state.name in settled or self.graph.nodes[state.name].get("trial_of") in by_name:
                continue  # a search's trials are built by its study, in its order
            if state.status == "dropped":  # lost its sweep's selection; its scores are known
                if evaluations is not None:
                    evaluations.know(state.name, state.digest)
                continue
            spec = self.mergefile.nodes[state.name]
            if isinstance(spec, SearchSpec):
                blocked = [r for r in spec.template.parent_refs() if r in failed]
                try:
                    if blocked:
                        raise MergebuildError(f"parent '{blocked[0]}' failed", node=spec.name)
                    found = make_search(self, spec, state, by_name,
                                        force=force and state.name in targets, device=device,
                                        reporter=reporter, evaluations=evaluations)
                except MergebuildError as exc:
                    if not keep_going:
                        raise
                    found = [NodeResult(state.name, "skipped" if blocked else "failed",
                                        exc.message)]
                results.extend(found)
                if found[-1].outcome != "fresh":
                    reporter.node_done(found[-1])
                if found[-1].outcome in ("failed", "skipped"):
                    failed.add(state.name)
                    if not keep_going:
                        break
                continue
            if isinstance(spec, SweepSpec):
                lost = [v for v in spec.variants if v in failed]
                if lost:
                    failed.add(state.name)
                    results.append(NodeResult(state.name, "skipped",
                                              f"variant '{lost[0]}' failed"))
                    reporter.node_done(results[-1])
                elif spec.select is not None and evaluations is not None:
                    try:
                        refused = self._select(spec, state, by_name, device, reporter,
                                               evaluations)
                    except MergebuildError as exc:
                        if not keep_going:
                            raise
                        refused = NodeResult(state.name, "failed", str(exc))
                    if refused is not None:  # no variant passed its checks
                        failed.add(state.name)
                        results.append(refused)
                        reporter.node_done(refused)
                        if not keep_going:
                            break
                else:
                    state.status = "fresh"
                continue
            if isinstance(spec, AdaptedSpec):
                if spec.model in failed:
                    failed.add(state.name)
                    results.append(NodeResult(state.name, "skipped",
                                              f"parent '{spec.model}' failed"))
                    reporter.node_done(results[-1])
                else:  # its merge is built now: the identity children's keys use
                    adapt(state, spec, by_name[spec.model])
                continue
            assert isinstance(spec, MergeSpec)
            blocked = [r for r in spec.parent_refs() if r in failed]
            if blocked:
                failed.add(state.name)
                results.append(NodeResult(state.name, "skipped",
                                          f"parent '{blocked[0]}' failed"))
                reporter.node_done(results[-1])
                continue
            sweep = sweep_of.get(state.name)
            forced = force and (state.name in targets or sweep in targets)
            # A variant ranked by its sweep's select: failing its checks is kept out of the
            # ranking (reported), not failed: the sweep selects the best that passes.
            ranked = sweep is not None and self.mergefile.nodes[sweep].select is not None  # type: ignore[union-attr]
            if sweep is not None and state.status != "fresh":
                # Every stale variant of the sweep at once: they share their parents.
                group = [by_name[v] for v in self.mergefile.nodes[sweep].variants  # type: ignore[union-attr]
                         if v in by_name and by_name[v].status != "fresh"]
                settled.update(s.name for s in group)
                try:
                    group_results = self._make_variants(group, by_name, forced, device,
                                                        reporter)
                except MergebuildError as exc:
                    if not keep_going:
                        raise
                    failed.update(s.name for s in group)
                    group_results = [NodeResult(s.name, "failed", str(exc)) for s in group]
                for result in group_results:
                    reporter.node_done(result)
                for variant, result in zip(group, group_results, strict=True):
                    if evaluations is not None and result.outcome != "failed":
                        try:
                            result = self._score_variant(variant, result, evaluations,
                                                         ranked)
                        except MergebuildError as exc:
                            if not keep_going:
                                raise
                            result = NodeResult(variant.name, "failed", str(exc))
                        if result.outcome == "failed":  # its checks, or its evaluation
                            reporter.node_done(result)
                        elif result.failed_checks:
                            reporter.excluded(variant.name, sweep, result.checks)
                    if result.outcome == "failed":
                        failed.add(variant.name)
                    results.append(result)
                if not keep_going and any(s.name in failed for s in group):
                    break  # a variant failed (its build, its evaluation, or its checks
                    # in a sweep without select:): stop, as for any failed node
                continue
            try:
                result = self._make_node(spec, state, by_name, forced, device, reporter,
                                         evaluations)
                if evaluations is not None:
                    result = self._gate(state, result, evaluations, ranked)
            except MergebuildError as exc:
                if not keep_going:
                    raise
                failed.add(state.name)
                result = NodeResult(state.name, "failed", str(exc))
            results.append(result)
            if result.outcome != "fresh":
                reporter.node_done(result)
                if result.outcome != "failed" and result.failed_checks:
                    reporter.excluded(state.name, sweep or state.name, result.checks)
            if result.outcome == "failed":
                failed.add(state.name)
                if not keep_going:
                    break
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

    def _make_node(self, spec: MergeSpec, state: NodeState, states: dict[str, NodeState],
                   force: bool, device: str | None, reporter: Reporter,
                   evaluations: Evaluations | None = None) -> NodeResult:
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
        with self.store.lock(key, on_wait=lambda: reporter.waiting(spec.name)):
            found = None if force else self.store.lookup(key)
            if found:
                state.status, state.digest, state.path = "fresh", found.digest, found.path
                self._record(spec, method, state)
                return NodeResult(spec.name, "reused", "built by another mergebuild",
                                  path=found.path)
            t0 = time.monotonic()
            path, written = self._build(spec, method, state, states, key, recipe, device,
                                        reporter, evaluations)
        state.status, state.path = "fresh", path
        faults.point("project.before_ref")
        self._record(spec, method, state)
        faults.point("project.node_done")
        return NodeResult(spec.name, "built", "; ".join(state.reasons),
                          seconds=time.monotonic() - t0, bytes_written=written, path=path)

    def make_trial(self, spec: MergeSpec, state: NodeState, states: dict[str, NodeState],
                   force: bool, device: str | None, reporter: Reporter,
                   evaluations: Evaluations | None) -> NodeResult:
        """One trial of a search, built (and scored on its evals) like any merge node."""
        return self._make_node(spec, state, states, force, device, reporter, evaluations)

    def _make_variants(self, group: list[NodeState], states: dict[str, NodeState],
                       force: bool, device: str | None, reporter: Reporter
                       ) -> list[NodeResult]:
        """A sweep's stale variants, built in one pass over their shared parents.

        Variants already in the store (built before, or by another mergebuild) are reused;
        variants whose recipes are identical (two points meaning the same merge) are built
        once. Every key is built under its own lock, taken in key order.
        """
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
        with contextlib.ExitStack() as locks:
            for key in sorted(todo):
                found = None if force else self.store.lookup(key)
                if found is None:
                    name = todo[key][0][0].name
                    locks.enter_context(self.store.lock(
                        key, on_wait=lambda name=name: reporter.waiting(name)))
                    found = None if force else self.store.lookup(key)
                if found is not None:
                    for spec, state, _ in todo.pop(key):
                        state.status, state.digest, state.path = "fresh", found.digest, found.path
                        self._record(spec, METHODS[spec.method], state)
                        results[spec.name] = NodeResult(spec.name, "reused",
                                                        "already built (same recipe)",
                                                        path=found.path)
            if todo:
                t0 = time.monotonic()
                built = self._build_variants([same[0] for same in todo.values()], states,
                                             device, reporter)
                seconds = time.monotonic() - t0
                for (key, same), (path, written) in zip(todo.items(), built, strict=True):
                    first = same[0][0].name
                    for k, (spec, state, _) in enumerate(same):
                        state.status, state.path = "fresh", path
                        state.digest = same[0][1].digest
                        self._record(spec, METHODS[spec.method], state)
                        results[spec.name] = (
                            NodeResult(spec.name, "built",
                                       f"{'; '.join(state.reasons)}; one pass with "
                                       f"{len(built)} variant(s)", seconds=seconds,
                                       bytes_written=written, path=path) if k == 0 else
                            NodeResult(spec.name, "reused", f"the same recipe as {first}",
                                       path=path))
        return [results[s.name] for s in group]

    def _build_variants(self, todo: list[tuple[MergeSpec, NodeState, dict[str, Any]]],
                        states: dict[str, NodeState], device: str | None,
                        reporter: Reporter) -> list[tuple[Path, int]]:
        """Build variants over the same parents in one pass; publish each."""
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
        published: list[tuple[Path, int]] = []
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
                                                     output.xxh128), output.bytes_written))
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

    def _build(self, spec: MergeSpec, method: Method, state: NodeState,
               states: dict[str, NodeState], key: str, recipe: dict[str, Any],
               device: str | None, reporter: Reporter,
               evaluations: Evaluations | None = None) -> tuple[Path, int]:
        from mergebuild.build.engine import run_build
        from mergebuild.provenance.write import write_provenance

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
        return path, output.bytes_written

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
