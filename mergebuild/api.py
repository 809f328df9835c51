"""The Python API: a Project binds a Mergefile and its store to the verbs (plan, make,
check, verify, gc, pin, export, push); each verb that uses the store holds its lock."""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mergebuild.build.events import MakeResult, Reporter
from mergebuild.build.record import excerpt, utc_now
from mergebuild.errors import MergebuildError, MergefileError, StoreError
from mergebuild.plan.lockfile import LockedResolver, SourceLock
from mergebuild.plan.staleness import NodeState, Planner
from mergebuild.spec.graph import build_graph
from mergebuild.spec.model import Mergefile, MergeSpec
from mergebuild.spec.parse import load_mergefile
from mergebuild.store.objects import Store

if TYPE_CHECKING:
    from mergebuild.build.make import Maker
    from mergebuild.provenance.lineage import LineageNode
    from mergebuild.store.gc import GcReport
    from mergebuild.verbs.export import ExportResult
    from mergebuild.verbs.metrics import NodeMetrics
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
        """The directory of ``node``'s current build; StoreError if it is not built."""
        path = self.planner.current(node).path
        assert path is not None
        return path

    def build_dir(self, node: str) -> Path:
        """The store directory of ``node``'s current key, even if it fails the cheap
        integrity check (so that ``verify`` can say why); else as :meth:`path`."""
        return self.planner.build_dir(node)

    def excerpt(self, node: str) -> str:
        """The YAML of ``node`` and its ancestors: enough to rebuild it."""
        return excerpt(self.mergefile, self.graph, node)

    # building ----------------------------------------------------------------------------
    @_uses_store(create=True)
    def make(self, targets: list[str] | tuple[str, ...] = (), *, force: bool = False,
             keep_going: bool = False, device: str | None = None,
             reporter: Reporter | None = None) -> MakeResult:
        """Build every stale node the targets need; reuse the rest.

        A node whose parents were rebuilt is looked up again with their new digests: when a
        parent's bytes did not change, the child is reused (early cutoff).
        """
        return self._maker(self.store).make(list(targets), force=force, keep_going=keep_going,
                                            device=device, reporter=reporter or Reporter())

    @_uses_store()
    def check(self, node: str, device: str | None = None,
              reporter: Reporter | None = None) -> ReproReport:
        """Rebuild ``node`` (parents from the store) into a scratch dir, never published,
        and compare every output file with the stored build."""
        from mergebuild.verbs.reproduce import check_reproducible

        state = next(s for s in self.planner.plan([node]) if s.name == node)

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
    def verify(self, node: str) -> VerifyReport:
        """Re-hash ``node``'s current build against its provenance and walk its chain."""
        from mergebuild.verbs.verify import verify_build

        return verify_build(self.build_dir(node))

    @staticmethod
    def verify_directory(directory: str | Path) -> VerifyReport:
        """:meth:`verify` for a built model directory (no Mergefile, no store)."""
        from mergebuild.verbs.verify import verify_build

        return verify_build(Path(directory))

    @_uses_store()
    def lineage(self, node: str) -> LineageNode:
        """What ``node``'s current build is made of: every stage, method and digest."""
        from mergebuild.provenance.lineage import load_lineage

        return load_lineage(self.build_dir(node))

    @staticmethod
    def directory_lineage(directory: str | Path) -> LineageNode:
        """:meth:`lineage` of a built model directory (no Mergefile, no store)."""
        from mergebuild.provenance.lineage import load_lineage

        return load_lineage(Path(directory))

    # the store ---------------------------------------------------------------------------
    @_uses_store(removes=True)
    def collect_garbage(self, dry_run: bool = False) -> GcReport:
        """Remove store objects no node reaches and leftovers of dead builds (see
        ``store/gc.py``); with ``dry_run``, only list them."""
        from mergebuild.sources.resolve import live_demo_dirs
        from mergebuild.store.gc import collect_garbage

        try:
            keep = self.planner.live_keys()
        except MergebuildError as exc:
            raise StoreError(f"gc cannot work out what is reachable: {exc}; nothing was removed",
                             hint="fix the Mergefile or make its sources available") from None
        return collect_garbage(self.store, keep, mergefile=self.mergefile.path,
                               live_demo=live_demo_dirs(self.store), dry_run=dry_run)

    @_uses_store()
    def pin(self, node: str, name: str | None = None) -> tuple[str, dict[str, Any]]:
        """Keep ``node``'s current build out of ``gc``'s reach under ``name`` (default: the
        node's name), whatever later happens to the Mergefile; returns (name, record)."""
        name = name or node
        if not _PIN_NAME.match(name):
            raise MergefileError(f"invalid pin name '{name}'", node=node,
                                 hint="use letters, digits, '.', '_' and '-' (e.g. v1.0)")
        state = self.planner.current(node)
        if state.kind != "merge" or state.key is None:
            raise StoreError("is a source, not a build; only builds can be pinned",
                             node=node, hint="pin a merge node")
        record = {"key": state.key, "digest": state.digest, "node": node,
                  "mergefile": str(self.mergefile.path), "path": str(state.path),
                  "pinned": utc_now()}
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
    def export(self, node: str, directory: str | Path, force: bool = False) -> ExportResult:
        """Copy ``node``'s verified build to ``directory``."""
        from mergebuild.verbs.export import export_build

        return export_build(self.path(node), Path(directory), force=force, node=node)

    @_uses_store()
    def push(self, node: str, repo_id: str, private: bool = False,
             revision: str | None = None) -> str:
        """Verify ``node``'s build and upload it to the Hub as ``repo_id``; the commit URL."""
        from mergebuild.verbs.export import push_build

        return push_build(self.path(node), repo_id, private=private, revision=revision,
                          node=node)
