"""The Python API: a Project binds a Mergefile and its store to the verbs (plan, make,
check, verify, gc, pin, export, push); each verb that uses the store holds its lock."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mergebuild.build.events import MakeResult, Reporter
from mergebuild.build.record import excerpt, selected_variants, utc_now
from mergebuild.errors import MergebuildError, MergefileError, StoreError, shorten
from mergebuild.plan.lockfile import LockedResolver, SourceLock
from mergebuild.plan.staleness import NodeState, Planner
from mergebuild.spec.graph import ancestors, build_graph
from mergebuild.spec.model import (
    AdaptedSpec,
    Mergefile,
    MergeSpec,
    SearchSpec,
    SourceSpec,
    SweepSpec,
)
from mergebuild.spec.parse import load_mergefile
from mergebuild.store.objects import Store

if TYPE_CHECKING:
    from mergebuild.build.make import Maker
    from mergebuild.plan.search import Study
    from mergebuild.provenance.lineage import LineageNode
    from mergebuild.store.gc import GcReport
    from mergebuild.verbs.audit_report import Evaluation, ReportTarget, SearchStudy, SweepRow
    from mergebuild.verbs.card import PresentedCard
    from mergebuild.verbs.export import ExportResult, Protected
    from mergebuild.verbs.inspect import InspectReport
    from mergebuild.verbs.metrics import Leaderboard, NodeMetrics
    from mergebuild.verbs.reproduce import ReproReport
    from mergebuild.verbs.verify import VerifyReport

Verb = TypeVar("Verb", bound=Callable[..., Any])

_PIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_store_dir(mergefile_path: Path) -> Path:
    env = os.environ.get("MERGEBUILD_CACHE")
    if env:
        return Path(env)
    return mergefile_path.resolve().parent / "cache"


def _uses_store(*, create: bool = False, removes: bool = False) -> Callable[[Verb], Verb]:
    """The verb runs holding the store's use lock: shared, so a ``gc`` waits for it (and it
    for a ``gc``, telling the verb's reporter), or, for a verb that ``removes`` objects,
    exclusive unless it is a dry run. ``create``: the verb is about to write the store, so
    it is locked even if it does not exist yet. A verb's ``targets`` are checked before the
    store is touched."""

    def decorate(verb: Verb) -> Verb:
        signature = inspect.signature(verb)

        @functools.wraps(verb)
        def locked(self: Project, *args: Any, **kwargs: Any) -> Any:
            call = signature.bind(self, *args, **kwargs)
            call.apply_defaults()
            if "targets" in call.arguments:
                self.planner.targets_or_default(call.arguments["targets"])
            if removes and not call.arguments["dry_run"]:
                holding = self.store.exclusive()
            else:
                reporter = call.arguments.get("reporter")
                holding = self.store.in_use(
                    on_wait=reporter.store_busy if reporter is not None else None,
                    create=create)
            with holding:
                return verb(self, *args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate


class Project:
    """A Mergefile and its store.

    Example:
        >>> project = Project("Mergefile.example")
        >>> [s.status for s in project.plan(["final-model"])]
    """

    def __init__(self, mergefile: str | Path = "Mergefile", cache_dir: str | Path | None = None,
                 *, frozen: bool = False):
        self.mergefile: Mergefile = load_mergefile(mergefile)
        self.graph = build_graph(self.mergefile)
        self.store = Store(Path(cache_dir) if cache_dir else default_store_dir(self.mergefile.path))
        self.frozen = frozen
        self.lock = SourceLock(self.mergefile, frozen=frozen)
        self.sources = LockedResolver(self.store, self.lock)
        self.planner = Planner(self.mergefile, self.graph, self.store, self.sources)

    def _maker(self, store: Store) -> Maker:
        from mergebuild.build.make import Maker

        return Maker(self.mergefile, self.graph, self.planner, self.lock, store)

    # planning ----------------------------------------------------------------------------
    def targets_or_default(self, targets: list[str] | tuple[str, ...]) -> list[str]:
        return self.planner.targets_or_default(targets)

    def plan(self, targets: list[str] | tuple[str, ...] = (), force: bool = False
             ) -> list[NodeState]:
        """Each node the targets need, parents first, with its status and stale reasons.

        Reads no weight bytes: local sources are identified through the stat cache, built
        nodes through the store's metadata. Imports no torch.
        """
        return self.planner.plan(targets, force=force)

    def path(self, node: str) -> Path:
        """The directory of ``node``'s current build (or of the build pin ``node`` keeps: a
        name that is not a node, or ``pin:NAME``); StoreError if it is not built."""
        pin = self._pin_named(node)
        if pin is not None:
            name, record = pin
            found = self.store.lookup(str(record["key"]))
            if found is None:
                raise StoreError(f"the build pin '{name}' keeps ({str(record['key'])[:12]}) is "
                                 "missing or fails its integrity check",
                                 hint=f"'mergebuild verify pin:{name}' says why; "
                                      f"'mergebuild pin --remove {name}' drops the pin")
            return found.path
        path = self.planner.current(node).path
        assert path is not None
        return path

    def model_dir(self, node: str) -> Path:
        """A directory holding ``node``'s weights: a source's files (a demo model generated, a
        hub snapshot fetched, when not here yet), else the node's current build."""
        spec = self.mergefile.nodes.get(node)
        if isinstance(spec, SourceSpec):
            from mergebuild.sources.resolve import materialize

            state = next(s for s in self.planner.plan([node]) if s.name == node)
            assert state.source is not None
            return materialize(state.source, self.store)
        return self.path(node)

    def build_dir(self, node: str) -> Path:
        """The store directory of ``node``'s current key (or of pin ``node``), even if it
        fails the cheap integrity check (so that ``verify`` can say why); else as
        :meth:`path`."""
        pin = self._pin_named(node)
        if pin is not None:
            name, record = pin
            directory = self.store.object_dir(str(record["key"]))
            if not directory.is_dir():
                raise StoreError(f"the build pin '{name}' keeps ({str(record['key'])[:12]}) is "
                                 "missing from the store",
                                 hint=f"'mergebuild pin --remove {name}' drops the pin")
            return directory
        return self.planner.build_dir(node)

    def _pin_named(self, name: str) -> tuple[str, dict[str, Any]] | None:
        """The pin a build name means: ``pin:NAME`` always, a bare name only when no node of
        the Mergefile has it (a node name means the node's current build)."""
        explicit = name.startswith("pin:")
        if not explicit and name in self.mergefile.nodes:
            return None
        pin_name = name[4:] if explicit else name
        record = self.store.read_pins().get(pin_name) if _PIN_NAME.match(pin_name) else None
        if record is None:
            if explicit:
                pins = ", ".join(self.store.read_pins()) or "none"
                raise StoreError(f"no pin named '{pin_name}'", hint=f"pins: {pins}")
            return None
        return pin_name, record

    def excerpt(self, node: str) -> str:
        """The YAML of ``node`` and its ancestors: enough to rebuild it (each sweep it builds
        on written as the variant it selects, as planned now)."""
        states = {s.name: s for s in self.plan([node])}
        return excerpt(self.mergefile, self.graph, node, selected_variants(states))

    # building ----------------------------------------------------------------------------
    @_uses_store(create=True)
    def make(self, targets: list[str] | tuple[str, ...] = (), *, force: bool = False,
             keep_going: bool = False, device: str | None = None,
             reporter: Reporter | None = None, allow_nonfinite: bool = False,
             jobs: int = 1, executor: str = "local", ray_address: str | None = None
             ) -> MakeResult:
        """Build every stale node the targets need; reuse the rest.

        A node whose parents were rebuilt is looked up again with their new digests: when a
        parent's bytes did not change, the child is reused (early cutoff). A parent tensor
        holding NaN or Inf fails the build (naming node, parent and tensor) unless
        ``allow_nonfinite`` or the node's ``allow_nonfinite: true``.

        ``jobs`` > 1 builds independent nodes (and sweeps) at once in that many processes;
        ``executor="ray"`` hands them to the Ray cluster at ``ray_address`` (default: the
        one this machine belongs to). The outputs are byte for byte a serial make's.
        """
        from mergebuild.build.executors import open_executor

        with open_executor(executor, jobs, ray_address,
                           device or self.mergefile.defaults.device) as runner:
            return self._maker(self.store).make(list(targets), force=force,
                                                keep_going=keep_going, device=device,
                                                reporter=reporter or Reporter(),
                                                allow_nonfinite=allow_nonfinite,
                                                executor=runner)

    @_uses_store()
    def check(self, node: str, device: str | None = None,
              reporter: Reporter | None = None) -> ReproReport:
        """Rebuild ``node`` (parents from the store) into a scratch dir, never published,
        and compare every output file with the stored build."""
        from mergebuild.verbs.reproduce import check_reproducible

        state = next(s for s in self.planner.plan([node]) if s.name == node)
        if state.kind == "search" and (state.selection is None or state.digest is None):
            raise StoreError("is a search with no selected trial yet: it has no build of its "
                             "own", node=node, hint=f"run 'mergebuild make {node}' first")
        if state.kind in ("sweep", "search"):  # no build of its own: check what it stands for
            if state.selection is None or state.digest is None:
                variants = self.mergefile.nodes[node].variants  # type: ignore[union-attr]
                raise StoreError("is a sweep with no selected variant: it has no build of "
                                 "its own", node=node,
                                 hint=f"check one variant: mergebuild make --check "
                                      f"'{variants[0]}'")
            node = state.selection.winner
            state = next(s for s in self.planner.plan([node]) if s.name == node)
        if (state.kind == "merge" and state.status == "stale" and state.key
                and self.store.object_dir(state.key).is_dir()):
            # The current build fails the store's check (a damaged file): compare it anyway,
            # file by file, so the report names what differs.
            state.status, state.path = "fresh", self.store.object_dir(state.key)

        def rebuild(scratch: Store) -> Path:
            result = self._maker(scratch).make([node], force=True, device=device,
                                               reporter=reporter or Reporter())
            path = next(r.path for r in result.results if r.name == node)
            assert path is not None
            return path

        return check_reproducible(state, self.store, rebuild)

    # evaluating --------------------------------------------------------------------------
    def metrics(self, nodes: list[str] | tuple[str, ...] = ()) -> list[NodeMetrics]:
        """What the store knows of each node's current model (default: every node scored on
        something): scores per eval, retention of each scored ancestor's own evals, checks,
        and the previous build's scores. Runs no evaluation."""
        from mergebuild.verbs.metrics import collect_metrics, scored_nodes

        nodes = list(nodes) or scored_nodes(self.mergefile, self.graph)
        states = self.planner.plan(nodes) if nodes else []
        return collect_metrics(self.mergefile, self.graph, self.store, states, nodes)

    def leaderboard(self, sweep: str) -> Leaderboard:
        """``sweep``'s variants ranked by its ``select:`` from the stored scores, with the
        selected one (once every variant is built and scored). Runs no evaluation."""
        from mergebuild.verbs.metrics import leaderboard, search_leaderboard

        self.planner.targets_or_default([sweep])
        if self.is_search(sweep):  # its trials so far, ranked as its study ranks them
            return search_leaderboard(self.mergefile, self.graph, self.store,
                                      self.planner.plan([sweep]), sweep)
        return leaderboard(self.mergefile, self.graph, self.store,
                           self.planner.plan([sweep]), sweep)

    def is_search(self, node: str) -> bool:
        return isinstance(self.mergefile.nodes.get(node), SearchSpec)

    def study(self, node: str) -> Study:
        """Search ``node``'s study as far as the store has it: each trial built and scored,
        in order, the best and why, and the next trial (replayed; nothing runs)."""
        from mergebuild.plan.search import Study

        spec = self.mergefile.nodes.get(node)
        if not isinstance(spec, SearchSpec):
            raise MergefileError(f"'{node}' is not a search", file=str(self.mergefile.path),
                                 node=node, hint="name a node with search:")
        state = next(s for s in self.planner.plan([node]) if s.name == node)
        return state.study or Study(search=spec, trials=(), waiting=state.reasons[0])

    def retain_thresholds(self) -> dict[str, float]:
        """{node: its ``checks.retain``} for every node that has one."""
        return {name: spec.checks.retain for name, spec in self.mergefile.nodes.items()
                if isinstance(spec, MergeSpec) and spec.checks.retain is not None}

    def scores(self, node: str) -> dict[str, dict[str, float]]:
        """``{eval name: {metric: value}}`` of ``node``'s current model, from the store (what
        ``make`` or ``eval`` measured; an eval not yet run is absent). The API sweeps'
        ``select:`` reads."""
        return self.metrics([node])[0].scores

    @_uses_store(create=True)
    def evaluate(self, nodes: list[str] | tuple[str, ...], *, device: str | None = None,
                 reporter: Reporter | None = None) -> list[NodeMetrics]:
        """Run the evals ``nodes`` need on their current models (and, for a retain check,
        their scored ancestors'), building nothing; returns their metrics."""
        from mergebuild.verbs.metrics import evaluate_nodes

        nodes = list(nodes)
        self.planner.targets_or_default(nodes)
        evaluate_nodes(self.mergefile, self.graph, self.store, self.planner.plan(nodes),
                       nodes, reporter or Reporter(), device)
        return self.metrics(nodes)

    # auditing ----------------------------------------------------------------------------
    @_uses_store()
    def verify(self, node: str, public_key: Any = None) -> VerifyReport:
        """Re-hash ``node``'s current build against its provenance, walk its chain, and
        check that it is what the store published (and, with ``public_key``, signed)."""
        from mergebuild.verbs.verify import verify_build

        path = self.build_dir(node)
        return verify_build(path, **self._published(path), public_key=public_key)

    @staticmethod
    def verify_directory(directory: str | Path, public_key: Any = None) -> VerifyReport:
        """:meth:`verify` for a built model directory (no Mergefile, no store): with
        ``public_key`` (an exported, signed model) it needs to trust nothing but the key."""
        from mergebuild.verbs.verify import verify_build

        return verify_build(Path(directory), public_key=public_key)

    def _published(self, path: Path) -> dict[str, Any]:
        """For a store object, the digest the store recorded when it published it."""
        if path.parent.parent != self.store.objects:
            return {}  # a source's directory: nothing was published
        record = self.store.read_published(path.name)
        return {"in_store": True, "published_digest": record.digest if record else None}

    @_uses_store()
    def lineage(self, node: str) -> LineageNode:
        """What ``node``'s current build is made of: every stage, method and digest, and each
        stage's scores as the store holds them."""
        from mergebuild.provenance.lineage import load_lineage
        from mergebuild.verbs.metrics import with_scores

        return with_scores(load_lineage(self.build_dir(node)), self.store)

    @staticmethod
    def directory_lineage(directory: str | Path) -> LineageNode:
        """:meth:`lineage` of a built model directory (no Mergefile, no store)."""
        from mergebuild.provenance.lineage import load_lineage

        return load_lineage(Path(directory))

    @_uses_store()
    def inspect(self, nodes: list[str] | tuple[str, ...], base: str | None = None,
                merged: list[str] | tuple[str, ...] = (), density: float = 0.5,
                device: str = "cpu") -> InspectReport:
        """Weight-space diagnostics of ``nodes``' task vectors relative to ``base`` (see
        ``verbs/inspect.py``); each node is read from its directory (a source available here,
        or a fresh build). One merge node without ``base`` means: its parents relative to
        its ``base_model``, with the merge itself measured against them."""
        from mergebuild.verbs.inspect import inspect_models

        nodes, merged = list(nodes), list(merged)
        if base is None and len(nodes) == 1 and not merged:
            spec = self.mergefile.nodes.get(nodes[0])
            if isinstance(spec, MergeSpec):
                if spec.base is None:
                    raise MergefileError("has no base_model to take task vectors against",
                                         node=spec.name, hint="pass --base NODE")
                merged, base = nodes, spec.base
                nodes = [r for r in spec.parent_refs() if r != spec.base]
        if base is None:
            raise MergebuildError("inspect needs a base to take task vectors against",
                                  hint="pass --base NODE, or one merge node with a base_model")
        report = inspect_models({n: self.model_dir(n) for n in nodes}, self.model_dir(base),
                                merged={n: self.path(n) for n in merged}, density=density,
                                device=device)
        return dataclasses.replace(report, base=base)

    # the card ----------------------------------------------------------------------------
    def licences(self, node: str) -> dict[str, str | None]:
        """{parent: licence or None} of a merge node: a source's from its Mergefile card,
        else its card or config; a merge parent's from its card block, else its parents'
        when they agree."""
        spec = self.mergefile.nodes[node]
        if not isinstance(spec, MergeSpec):
            return {}
        return {ref: self._licence(ref) for ref in spec.parent_refs()}

    def _licence(self, node: str) -> str | None:
        from mergebuild.provenance.card import licence_of, merged_licence

        spec = self.mergefile.nodes[node]
        if isinstance(spec, AdaptedSpec):
            return self._licence(spec.model)
        if isinstance(spec, SweepSpec):  # every variant has the same parents
            return self._licence(spec.variants[0])
        if isinstance(spec, SourceSpec):
            if spec.license:
                return spec.license
            try:
                return licence_of(self.model_dir(node))
            except MergebuildError:
                return None
        card = self.mergefile.card_of(node)
        return merged_licence(card.license if card else None, self.licences(node))

    def card(self, node: str, build: Path | None = None) -> PresentedCard:
        """The card ``node``'s current build goes out with: its own card with the Mergefile's
        ``card:`` block and the parents' licences applied, kept in the store beside the
        object (see ``verbs/card.py``); StoreError if it is not built."""
        from mergebuild.verbs.card import present_card

        build = build or self.path(node)
        pinned = self._pin_named(node)
        if pinned is not None:  # the card of the node that built it, if the Mergefile has it
            node = str(pinned[1].get("node") or pinned[0])
        here = node in self.mergefile.nodes
        card = self.mergefile.card_of(node) if here else None
        return present_card(self.store.root / "cards", build, node,
                            card.to_json() if card else {}, self.licences(node) if here else {})

    # release review ----------------------------------------------------------------------
    @_uses_store()
    def report(self, targets: list[str] | tuple[str, ...] = (), *, scan: bool = True
               ) -> list[ReportTarget]:
        """What the release-review page shows of each built target (default: every final
        node): lineage, verification, signature, card and licences, warnings (with
        ``scan``, non-finite values found by reading the weights once)."""
        from mergebuild.provenance.card import split_front_matter
        from mergebuild.provenance.lineage import load_lineage
        from mergebuild.verbs.audit_report import ReportTarget, nonfinite_tensors
        from mergebuild.verbs.verify import verify_build

        out = []
        for name in self.targets_or_default(list(targets)):
            build = self.build_dir(name)  # even a corrupt one: the page says what is wrong
            verified = verify_build(build)
            card = self.card(name, build)
            warnings = list(card.warnings)
            if scan:
                warnings += [f"non-finite values in {found}" for found in nonfinite_tensors(build)]
            signatures = sorted(p.name for p in build.iterdir()
                                if p.name.endswith((".dsse.json", ".sig", ".intoto.jsonl")))
            out.append(ReportTarget(
                name=name, directory=build, lineage=load_lineage(build),
                problems=tuple(str(p) for p in verified.problems), files=verified.files,
                signature=(f"signed ({', '.join(signatures)}); check the key with verify"
                           if signatures else "unsigned"),
                card=split_front_matter(card.text)[0], licences=self.licences(name),
                warnings=tuple(warnings), evaluations=self._report_evaluations(name),
                sweeps=self._report_sweeps(name), searches=self._report_searches(name)))
        return out

    def _report_sweeps(self, target: str) -> tuple[SweepRow, ...]:
        """The leaderboard of every sweep with ``select:`` that ``target`` is or builds on."""
        from mergebuild.verbs.audit_report import SweepRow

        wanted = ancestors(self.graph, target) | {target}
        rows = []
        for name, spec in self.mergefile.nodes.items():
            if not (isinstance(spec, SweepSpec) and spec.select is not None and name in wanted):
                continue
            for row in self.leaderboard(name).rows:
                rows.append(SweepRow(sweep=name, variant=row.variant, parameters=row.point,
                                     score=row.value, selected=row.selected, place=row.place,
                                     failed=row.failed))
        return tuple(rows)

    def _report_searches(self, target: str) -> tuple[SearchStudy, ...]:
        """The study of every search ``target`` is or builds on: its trials in the order
        the sampler asked for them, the selected one marked."""
        from mergebuild.verbs.audit_report import SearchStudy, SearchTrial

        wanted = ancestors(self.graph, target) | {target}
        studies = []
        for name, spec in list(self.mergefile.nodes.items()):
            if not (isinstance(spec, SearchSpec) and name in wanted):
                continue
            study, board = self.study(name), self.leaderboard(name)
            rows = tuple(SearchTrial(number=t.number, name=t.name, parameters=t.point,
                                     objective=t.value, selected=t.name == board.selected,
                                     failed=t.excluded) for t in study.trials)
            studies.append(SearchStudy(
                search=name, sampler=spec.sampler, seed=spec.seed, trials=spec.trials,
                select=f"{spec.select.goal} {spec.select.metric}", rows=rows, why=board.why))
        return tuple(studies)

    def _report_evaluations(self, target: str) -> tuple[Evaluation, ...]:
        """The scores the store holds for ``target`` and its scored ancestors, with the
        target's retention of each ancestor's own evals and its checks (none without evals)."""
        from mergebuild.verbs.audit_report import Evaluation
        from mergebuild.verbs.metrics import scored_nodes

        if not self.mergefile.evals:
            return ()
        wanted = ancestors(self.graph, target) | {target}
        nodes = [n for n in scored_nodes(self.mergefile, self.graph) if n in wanted]
        rows: list[Evaluation] = []
        for metrics in self.metrics(nodes) if nodes else []:
            verdicts = {(c.eval, c.metric): c.passed for c in metrics.checks if c.ancestor is None}
            for eval_name, values in sorted(metrics.scores.items()):
                for metric, value in sorted(values.items()):
                    rows.append(Evaluation(model=metrics.node, eval=f"{eval_name} {metric}",
                                           score=value,
                                           passed=verdicts.get((eval_name, metric))))
            if metrics.node != target:
                continue
            retained = {(c.ancestor, c.eval, c.metric): c.passed for c in metrics.checks
                        if c.ancestor is not None}
            for row in metrics.retention:
                if row.value is None or row.ratio is None:
                    continue
                rows.append(Evaluation(
                    model=target, eval=f"{row.eval} {row.metric}", score=row.value,
                    ancestor=row.ancestor, ancestor_score=row.ancestor_value,
                    retention=row.ratio,
                    passed=retained.get((row.ancestor, row.eval, row.metric))))
        return tuple(rows)

    # the store ---------------------------------------------------------------------------
    @_uses_store(removes=True)
    def collect_garbage(self, dry_run: bool = False, keep_variants: bool = False) -> GcReport:
        """Remove store objects no node reaches and leftovers of dead builds (see
        ``store/gc.py``); with ``dry_run``, only list them. The variants that lost a sweep's
        selection are removed too (their scores stay) unless ``keep_variants``."""
        from mergebuild.sources.resolve import live_demo_dirs
        from mergebuild.store.gc import collect_garbage

        try:
            keep, why_not_kept = self.planner.reachable(keep_variants=keep_variants)
        except MergebuildError as exc:
            raise StoreError(f"gc cannot work out what is reachable: {exc}; nothing was removed",
                             hint="fix the Mergefile or make its sources available") from None
        return collect_garbage(self.store, keep, mergefile=self.mergefile.path,
                               live_demo=live_demo_dirs(self.store), dry_run=dry_run,
                               why_not_kept=why_not_kept)

    @_uses_store()
    def pin(self, node: str, name: str | None = None, *, force: bool = False
            ) -> tuple[str, dict[str, Any]]:
        """Keep ``node``'s current build (or another pin's build) out of ``gc``'s reach under
        ``name`` (default: the node's name), whatever later happens to the Mergefile; returns
        (name, record). An existing pin of another build moves only with ``force``."""
        name = name or node.removeprefix("pin:")
        if not _PIN_NAME.match(name):
            raise MergefileError(f"invalid pin name {shorten(name)}", node=None,
                                 hint="use letters, digits, '.', '_' and '-' (e.g. v1.0)")
        pinned = self._pin_named(node)
        if pinned is not None:
            source = pinned[1]
            record = {"key": source["key"], "digest": source.get("digest"),
                      "node": source.get("node"), "mergefile": source.get("mergefile"),
                      "path": source.get("path"), "pinned": utc_now()}
        else:
            state = self.planner.current(node)
            if state.kind not in ("merge", "sweep", "search") or state.key is None:
                raise StoreError("is a source, not a build; only builds can be pinned",
                                 node=node, hint="pin a merge node")
            # A sweep's build is the variant its select: chose: the pin names that variant.
            built = state.selection.winner if state.selection is not None else node
            record = {"key": state.key, "digest": state.digest, "node": built,
                      "mergefile": str(self.mergefile.path), "path": str(state.path),
                      "pinned": utc_now()}
        existing = self.store.read_pins().get(name)
        if existing is not None and existing.get("key") != record["key"] and not force:
            raise StoreError(
                f"pin '{name}' already exists: it keeps {existing.get('node')}'s build "
                f"{str(existing.get('key'))[:12]} (pinned {existing.get('pinned')})",
                hint="pass --force to move it (its old build then becomes collectable), "
                     "or choose another name with --as")
        if existing is not None and existing.get("key") == record["key"]:
            return name, existing  # pinned already: nothing moves
        self.store.write_pin(name, record)
        return name, record

    def unpin(self, name: str) -> None:
        """Remove pin ``name`` (the build stays until ``gc`` finds it unreachable)."""
        if not self.store.remove_pin(name):
            pins = ", ".join(self.store.read_pins()) or "none"
            raise StoreError(f"no pin named '{name}'", hint=f"pins: {pins}")

    def pins(self) -> dict[str, dict[str, Any]]:
        """Every pin of the store: name → record (key, digest, node, mergefile, path)."""
        return self.store.read_pins()

    # shipping ----------------------------------------------------------------------------
    @_uses_store()
    def export(self, node: str, directory: str | Path, force: bool = False,
               fmt: str = "safetensors", quant: str = "f16", sign_key: Any = None
               ) -> ExportResult:
        """Copy ``node``'s verified build to ``directory`` (``fmt="safetensors"``), or convert
        it into one GGUF file there (``fmt="gguf"``, stored as ``quant``). ``force`` replaces
        only an earlier export or an empty directory, never the store, the project or a
        source. With ``sign_key`` (Ed25519) the export carries a DSSE envelope over its
        provenance."""
        from mergebuild.verbs.export import export_build, export_gguf_build

        if fmt not in ("safetensors", "gguf"):
            raise MergebuildError(f"unknown export format '{fmt}'", node=node,
                                  hint="use safetensors or gguf")
        path = self.build_dir(node)
        card = self.card(node, path)
        guard = {"protected": self._protected(), "sign_key": sign_key, **self._published(path)}
        if fmt == "gguf":
            return export_gguf_build(path, Path(directory), quant=quant, force=force,
                                     node=node, card=card.text, **guard)
        return export_build(path, Path(directory), force=force, node=node, card=card,
                            attached=self._added_evaluations(node, path), **guard)

    def _added_evaluations(self, node: str, path: Path) -> tuple[Path, ...]:
        from mergebuild.verbs.metrics import added_evaluations

        return added_evaluations(self.store, node, path)

    def _protected(self) -> Protected:
        from mergebuild.spec.model import AdaptedSpec, SourceSpec
        from mergebuild.verbs.export import Protected

        roots = [(self.mergefile.path.resolve().parent, "the Mergefile's directory")]
        for name, spec in self.mergefile.nodes.items():
            local = (spec.uri if isinstance(spec, SourceSpec) and spec.kind == "local" else
                     spec.adapter if isinstance(spec, AdaptedSpec) else None)
            if local and not local.startswith(("hf://", "demo://")):
                roots.append((Path(local), f"the source of '{name}'"))
        return Protected(store=self.store.root, roots=tuple(roots))

    @_uses_store()
    def push(self, node: str, repo_id: str, private: bool = False,
             revision: str | None = None, sign_key: Any = None) -> str:
        """Verify ``node``'s build and upload it to the Hub as ``repo_id`` (signed with
        ``sign_key``: a DSSE envelope travels with it); the commit URL."""
        from mergebuild.verbs.export import push_build

        path = self.build_dir(node)
        return push_build(path, repo_id, private=private, revision=revision, node=node,
                          card=self.card(node, path), sign_key=sign_key,
                          attached=self._added_evaluations(node, path),
                          **self._published(path))
