"""The Python API: load a Mergefile, plan what is stale and why, build it, find builds."""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from mergebuild import ENGINE_VERSION, __version__, faults
from mergebuild.errors import (
    BuildInterrupted,
    CheckpointError,
    MergebuildError,
    MergefileError,
    SourceError,
    StoreError,
)
from mergebuild.spec.graph import build_graph, build_order, check_targets, default_targets
from mergebuild.io.hashing import recipe_key
from mergebuild.spec.model import AdaptedSpec, Mergefile, MergeSpec, NodeKind, SourceSpec
from mergebuild.spec.parse import load_mergefile
from mergebuild.spec.validate import participants
from mergebuild.methods.registry import METHODS
from mergebuild.plan.recipe import (
    build_recipe,
    donor,
    global_parameters,
    parent_names,
    parent_parameters,
    recipe_changes,
)
from mergebuild.sources.resolve import (
    ResolvedSource,
    adapted_digest,
    adapter_directory,
    fetch_adapter,
    materialize,
    resolve_adapter,
    resolve_source,
)
from mergebuild.store.objects import Store

DEFAULT_SHARD_BYTES = 5 * 2**30


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


@dataclass
class NodeResult:
    name: str
    outcome: str  # "built" | "reused" | "fresh" | "failed" | "skipped"
    detail: str = ""
    seconds: float = 0.0
    bytes_written: int = 0
    path: Path | None = None


@dataclass
class MakeResult:
    results: list[NodeResult]
    seconds: float

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def ok(self) -> bool:
        return not any(r.outcome in ("failed", "skipped") for r in self.results)


class Reporter:
    """What a make tells its user; the CLI passes a rich or plain implementation."""

    def plan(self, states: list[NodeState]) -> None: ...
    def node_start(self, state: NodeState, tensors: int | None = None) -> None: ...
    def node_progress(self, name: str, done: int, total: int, bytes_done: int,
                      bytes_total: int) -> None: ...
    def node_done(self, result: NodeResult) -> None: ...
    def waiting(self, name: str) -> None: ...
    def store_busy(self) -> None: ...
    def download(self, node: str, label: str, done: int, total: int) -> None: ...
    def summary(self, result: MakeResult) -> None: ...


def default_store_dir(mergefile_path: Path) -> Path:
    env = os.environ.get("MERGEBUILD_CACHE")
    if env:
        return Path(env)
    return mergefile_path.resolve().parent / "cache"


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
        self._sources: dict[str, ResolvedSource] = {}
        # Hub sources resolve from the hub and are recorded in the lock by make; with
        # frozen, they resolve from the lock instead (like `cargo build --locked`).
        self.frozen = frozen
        self.lock_path = self.mergefile.path.with_name(self.mergefile.path.name + ".lock")
        self._lock = None

    # planning ----------------------------------------------------------------------------
    def targets_or_default(self, targets: list[str] | tuple[str, ...]) -> list[str]:
        targets = list(targets) or default_targets(self.graph)
        check_targets(self.mergefile, targets)
        return targets

    def _resolve_source(self, spec: SourceSpec) -> ResolvedSource:
        if spec.name not in self._sources:
            locked = adapter_locked = None
            if spec.kind == "hub":
                locked = self.lock.get(spec.name, uri=spec.uri)
            if spec.adapter is not None and spec.adapter.startswith("hf://"):
                adapter_locked = self.lock.get(_adapter_entry(spec.name), uri=spec.adapter)
            self._sources[spec.name] = resolve_source(spec, self.store, locked=locked,
                                                      frozen=self.frozen,
                                                      lock_name=self.lock_path.name,
                                                      adapter_locked=adapter_locked)
        return self._sources[spec.name]

    def _resolve_adapter(self, spec: AdaptedSpec) -> ResolvedSource:
        """The LoRA of a ``merge+lora`` node (hub adapters pinned like adapted sources')."""
        entry = _adapter_entry(spec.name)
        if entry not in self._sources:
            locked = None
            if spec.adapter_kind == "hub":
                locked = self.lock.get(entry, uri=spec.adapter)
            self._sources[entry] = resolve_adapter(spec.adapter, spec.name, self.store,
                                                   locked=locked, frozen=self.frozen,
                                                   lock_name=self.lock_path.name)
        return self._sources[entry]

    @property
    def lock(self):
        """The ``hub.LockFile`` beside the Mergefile (empty when there is none)."""
        if self._lock is None:
            from mergebuild.sources.hub import LockFile

            self._lock = LockFile.load(self.lock_path)
        return self._lock

    def _source_changes(self, entry: str, uri: str, src: ResolvedSource) -> list[str]:
        """How a hub source's (or hub adapter's) resolution differs from the one in the lock
        entry ``entry``, as reasons."""
        if src.kind != "hub" or not self.lock_path.exists():
            return []
        old = self.lock.get(entry)
        if old is None:
            return ["new source (not in the lock)"]
        if old.uri != uri:
            return [f"source changed ({old.uri} → {uri})"]
        if old.commit == src.commit:
            return []
        moved = f"{uri} moved {old.commit[:12]} → {(src.commit or '')[:12]}"
        if old.digest == src.digest:
            return [f"{moved} (same files)"]
        return [f"changed: {moved}"]

    def update_lock(self, states: list[NodeState]) -> bool:
        """Record every planned hub source's resolution in the lock; True if it was written.

        Entries of hub sources the plan did not reach are kept while the Mergefile still
        has them; entries of nodes that are gone are dropped.
        """
        from mergebuild.sources.hub import LockFile

        if self.frozen:
            return False
        lock = LockFile()
        for name in self.lock.nodes():
            is_adapter = name.endswith(_ADAPTER_SUFFIX)
            spec = self.mergefile.nodes.get(name.removesuffix(_ADAPTER_SUFFIX))
            if isinstance(spec, AdaptedSpec):
                uri = spec.adapter if is_adapter else None
            elif isinstance(spec, SourceSpec):
                uri = spec.adapter if is_adapter else spec.uri if spec.kind == "hub" else None
            else:
                continue
            if uri:
                entry = self.lock.get(name, uri=uri)
                if entry is not None:
                    lock.set(name, entry)
        for state in states:
            if state.adapter is not None and state.adapter.kind == "hub":
                lock.set(_adapter_entry(state.name), state.adapter.extra["resolution"])
            if state.source is None:
                continue
            if state.source.kind == "hub":
                lock.set(state.name, state.source.extra["resolution"])
            adapter = state.source.extra.get("adapter")
            if adapter is not None and adapter.kind == "hub":
                lock.set(_adapter_entry(state.name), adapter.extra["resolution"])
        if lock == self.lock and (self.lock_path.exists() or not lock.nodes()):
            return False
        try:
            lock.save(self.lock_path)
        except OSError as exc:
            raise StoreError(f"cannot write {self.lock_path.name} ({exc.strerror or exc})",
                             hint=f"check the permissions of {self.lock_path.parent}") from None
        self._lock = lock
        return True

    def plan(self, targets: list[str] | tuple[str, ...] = (), force: bool = False
             ) -> list[NodeState]:
        """Each node the targets need, parents first, with its status and stale reasons.

        Reads no weight bytes: local sources are identified through the stat cache, built
        nodes through the store's metadata. Imports no torch.
        """
        targets = self.targets_or_default(targets)
        states: dict[str, NodeState] = {}
        for name in build_order(self.graph, targets):
            spec = self.mergefile.nodes[name]
            if isinstance(spec, SourceSpec):
                src = self._resolve_source(spec)
                states[name] = NodeState(name=name, kind="source", status="source",
                                         digest=src.digest, source=src, path=src.directory,
                                         reasons=self._source_changes(spec.name, spec.uri, src))
                continue
            if isinstance(spec, AdaptedSpec):
                adapter = self._resolve_adapter(spec)
                states[name] = NodeState(
                    name=name, kind="adapted", status="pending", method="lora",
                    adapter=adapter,
                    reasons=self._source_changes(_adapter_entry(name), spec.adapter, adapter))
                _adapt(states[name], spec, states[spec.model])
                continue
            states[name] = self._plan_merge(spec, states, force and name in targets)
        return list(states.values())

    def _plan_merge(self, spec: MergeSpec, states: dict[str, NodeState], force: bool
                    ) -> NodeState:
        method = METHODS[spec.method]
        pending = [r for r in spec.parent_refs() if states[r].digest is None]
        recipe = build_recipe(spec, method,
                              lambda ref: states[ref].digest or f"pending:{ref}",
                              self.mergefile.defaults)
        state = NodeState(name=spec.name, kind="merge", status="stale", method=method.name,
                          recipe=recipe)
        previous = self.store.read_ref(spec.name)
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

    def path(self, node: str) -> Path:
        """The directory of ``node``'s current build; StoreError if it is not built."""
        path = self._current(node).path
        assert path is not None
        return path

    def _current(self, node: str) -> NodeState:
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

    # building ----------------------------------------------------------------------------
    def make(
        self,
        targets: list[str] | tuple[str, ...] = (),
        *,
        force: bool = False,
        keep_going: bool = False,
        device: str | None = None,
        reporter: Reporter | None = None,
    ) -> MakeResult:
        """Build every stale node the targets need; reuse the rest.

        A node whose parents were rebuilt is looked up again with their new digests: when a
        parent's bytes did not change, the child is reused (early cutoff).
        """
        reporter = reporter or Reporter()
        started = time.monotonic()
        targets = self.targets_or_default(targets)
        self._import_torch_early(force)
        with self.store.in_use(on_wait=reporter.store_busy, create=True):
            return self._make(targets, force, keep_going, device, reporter, started)

    def _make(self, targets: list[str], force: bool, keep_going: bool, device: str | None,
              reporter: Reporter, started: float) -> MakeResult:
        states = self.plan(targets, force=force)
        reporter.plan(states)
        self.update_lock(states)
        by_name = {s.name: s for s in states}
        results: list[NodeResult] = []
        failed: set[str] = set()
        for state in states:
            if state.kind == "source":
                continue
            spec = self.mergefile.nodes[state.name]
            if isinstance(spec, AdaptedSpec):
                if spec.model in failed:
                    failed.add(state.name)
                    results.append(NodeResult(state.name, "skipped",
                                              f"parent '{spec.model}' failed"))
                    reporter.node_done(results[-1])
                else:  # its merge is built now: the identity children's keys use
                    _adapt(state, spec, by_name[spec.model])
                continue
            assert isinstance(spec, MergeSpec)
            blocked = [r for r in spec.parent_refs() if r in failed]
            if blocked:
                failed.add(state.name)
                results.append(NodeResult(state.name, "skipped",
                                          f"parent '{blocked[0]}' failed"))
                reporter.node_done(results[-1])
                continue
            try:
                result = self._make_node(spec, state, by_name, force and state.name in targets,
                                         device, reporter)
            except MergebuildError as exc:
                if not keep_going:
                    raise
                failed.add(state.name)
                result = NodeResult(state.name, "failed", str(exc))
            results.append(result)
            if result.outcome != "fresh":
                reporter.node_done(result)
        outcome = MakeResult(results=results, seconds=time.monotonic() - started)
        reporter.summary(outcome)
        return outcome

    def _import_torch_early(self, force: bool) -> None:
        """Import torch on a thread while the plan hashes sources, when a merge node has never
        been built here (so something will be): the import (~2 s) then overlaps the hashing
        (~1 s for a 2.4 GB fresh store). A no-op make never imports torch."""
        merges = [n for n, s in self.mergefile.nodes.items() if isinstance(s, MergeSpec)]
        if not (force or any(self.store.read_ref(n) is None for n in merges)):
            return

        def load() -> None:
            with contextlib.suppress(BaseException):  # the engine's own import reports it
                importlib.import_module("torch")

        threading.Thread(target=load, name="import-torch", daemon=True).start()

    def _make_node(self, spec: MergeSpec, state: NodeState, states: dict[str, NodeState],
                   force: bool, device: str, reporter: Reporter) -> NodeResult:
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
                                        reporter)
        state.status, state.path = "fresh", path
        faults.point("project.before_ref")
        self._record(spec, method, state)
        faults.point("project.node_done")
        return NodeResult(spec.name, "built", "; ".join(state.reasons),
                          seconds=time.monotonic() - t0, bytes_written=written, path=path)

    def _record(self, spec: MergeSpec, method, state: NodeState) -> None:
        previous = self.store.read_ref(spec.name)
        if previous and previous.get("key") == state.key:
            return
        self.store.write_ref(spec.name, {
            "key": state.key, "digest": state.digest, "recipe": state.recipe,
            "parents": parent_names(spec, method), "mergefile": str(self.mergefile.path),
        })

    def _build(self, spec, method, state: NodeState, states: dict[str, NodeState], key: str,
               recipe: dict[str, Any], device: str, reporter: Reporter) -> tuple[Path, int]:
        from dataclasses import replace

        from mergebuild.build.engine import BuildJob, Participant, SliceInput, run_build
        from mergebuild.provenance.write import write_provenance

        slices = None
        if spec.slices is not None:
            slices = tuple(
                SliceInput(sources=tuple(
                    (src.ref, src.layer_range, parent_parameters(method, spec, src.parameters))
                    for src in s.sources))
                for s in spec.slices
            )
        job = BuildJob(
            node=spec.name, key=key, method=method, parents={},
            participants=tuple(Participant(ref, parent_parameters(method, spec, params))
                               for ref, params in participants(spec, method)),
            base=spec.base, donor=donor(spec),
            global_parameters=global_parameters(method, spec),
            out_dtype=spec.dtype or self.mergefile.defaults.dtype,
            slices=slices, chat_template=spec.chat_template,
            tokenizer_source=spec.tokenizer_source,
            pad_vocab_to=spec.tokenizer.pad_to_multiple_of if spec.tokenizer else None,
            max_shard_bytes=self.mergefile.defaults.max_shard_size or DEFAULT_SHARD_BYTES,
            device=device or self.mergefile.defaults.device,
        )
        # An incompatible recipe fails here, in seconds, before any weights are downloaded.
        self._check_before_fetch(job, spec, states)
        parent_dirs: dict[str, Path] = {}
        adapters = {}
        for ref in spec.parent_refs():
            parent = states[ref]
            if parent.kind == "adapted":  # the merge's build, its LoRA applied while streaming
                assert parent.adapter is not None
                parent_dirs[ref] = self._adapted_model_dir(ref, states)
                adapters[ref] = fetch_adapter(parent.adapter)
            elif parent.kind == "source":
                assert parent.source is not None
                parent_dirs[ref] = materialize(
                    parent.source, self.store,
                    progress=lambda label, done, total, ref=ref: reporter.download(
                        ref, label, done, total))
            else:
                assert parent.path is not None
                parent_dirs[ref] = parent.path
        for ref in parent_dirs:
            source = states[ref].source
            adapter = adapter_directory(source) if source is not None else None
            if adapter is not None:  # resolved once: a hub adapter is fetched here
                adapters[ref] = adapter
        job = replace(job, parents=parent_dirs, adapters=adapters)
        reporter.node_start(state)
        tmp = self.store.new_tmp(key)
        started = _now()
        try:
            output = run_build(job, tmp, progress=lambda *a: reporter.node_progress(spec.name, *a))
            self._check_sources_unchanged(spec, states)
            state.digest = output.digest
            record = self._build_record(spec, method, state, states, key, recipe, output,
                                        started)
            write_provenance(tmp, record)
            path = self.store.publish(tmp, key)
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

    def _adapted_model_dir(self, ref: str, states: dict[str, NodeState]) -> Path:
        """The store directory of the merge an adapted parent ``ref`` reads through its LoRA."""
        spec = self.mergefile.nodes[ref]
        assert isinstance(spec, AdaptedSpec)
        path = states[spec.model].path
        assert path is not None  # built before its children, in build order
        return path

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

    def _check_before_fetch(self, job, spec: MergeSpec, states: dict[str, NodeState]) -> None:
        """Check the parents fit from configs and headers alone: hub metadata comes from the
        cache or by range requests, local and built parents' headers from disk."""
        from mergebuild.build.compat import ModelMetadata, check_compatibility, directory_metadata
        from mergebuild.sources.hub import read_metadata
        from mergebuild.build.vocab import harmonize_metadata

        metadata = {}
        for ref in dict.fromkeys(spec.parent_refs()):
            parent = states[ref]
            try:
                if parent.source is not None and parent.source.kind == "hub":
                    config, tensors = read_metadata(parent.source.extra["resolution"], node=ref)
                    metadata[ref] = ModelMetadata(config=config, tensors=tensors)
                elif parent.source is not None:
                    metadata[ref] = directory_metadata(materialize(parent.source, self.store))
                elif parent.kind == "adapted":
                    metadata[ref] = directory_metadata(self._adapted_model_dir(ref, states))
                else:
                    assert parent.path is not None
                    metadata[ref] = directory_metadata(parent.path)
            except CheckpointError as exc:
                exc.node = exc.node or ref  # name the parent whose weights are unusable
                raise
        check_compatibility(job, harmonize_metadata(job, metadata))

    def _build_record(self, spec, method, state, states, key, recipe, output, started):
        import safetensors
        import torch

        from mergebuild.provenance.statement import BuildRecord, ParentRef, read_statement

        roles: dict[str, str] = {}
        if spec.base:
            roles[spec.base] = "base"
        for ref in spec.parent_refs():
            roles.setdefault(ref, "slice" if spec.slices is not None else "model")
        parents = []
        for ref in spec.parent_refs():
            p = states[ref]
            if p.kind == "source":
                src = p.source
                assert src is not None
                parents.append(ParentRef(
                    name=ref, role=roles[ref], kind="hub" if src.kind == "hub" else "local",
                    uri=src.uri, digest=src.digest, revision=src.revision, commit=src.commit,
                    files=dict(src.files),
                ))
            elif p.kind == "adapted":  # the merge as built, and the LoRA read over it
                node = self.mergefile.nodes[ref]
                assert isinstance(node, AdaptedSpec) and p.adapter is not None
                model, entry = states[node.model], _adapter_entry(ref)
                parents.append(ParentRef(
                    name=node.model, role=roles[ref], kind="node",
                    uri=f"mergebuild:node/{node.model}", digest=model.digest or "",
                    statement=read_statement(self._adapted_model_dir(ref, states)),
                    method=model.method, adapter=entry,
                ))
                parents.append(ParentRef(
                    name=entry, role="adapter", kind="lora", uri=p.adapter.uri,
                    digest=p.adapter.digest, revision=p.adapter.revision,
                    commit=p.adapter.commit, files=dict(p.adapter.files),
                    applies_to=node.model, adapted_digest=p.digest,
                ))
            else:
                assert p.path is not None
                parents.append(ParentRef(
                    name=ref, role=roles[ref], kind="node", uri=f"mergebuild:node/{ref}",
                    digest=p.digest or "", statement=read_statement(p.path), method=p.method,
                ))
        return BuildRecord(
            node=spec.name, key=key, digest=output.digest, method=method.name, recipe=recipe,
            spec=self._user_spec(spec, method), mergefile_digest=self._mergefile_digest(),
            mergefile_excerpt=self.excerpt(spec.name), parents=tuple(parents),
            outputs=output.files,
            builder={"mergebuild": __version__, "torch": torch.__version__,
                     "safetensors": safetensors.__version__,
                     "python": platform.python_version()},
            device=output.device, engine_version=ENGINE_VERSION, started=started,
            finished=_now(), invocation_id=secrets.token_hex(8),
            rebuild_command=f"mergebuild -f {self.mergefile.path.name} make {spec.name}",
        )

    def _user_spec(self, spec: MergeSpec, method) -> dict[str, Any]:
        out: dict[str, Any] = {"merge_method": method.name,
                               "parameters": global_parameters(method, spec)}
        if spec.base:
            out["base_model"] = spec.base
        if spec.slices is not None:
            out["slices"] = [{"sources": [
                {"model": s.ref, "layer_range": list(s.layer_range),
                 "parameters": parent_parameters(method, spec, s.parameters)}
                for s in sl.sources]} for sl in spec.slices]
        else:
            out["models"] = [{"model": p.ref,
                              "parameters": parent_parameters(method, spec, p.parameters)}
                             for p in spec.models]
        for key, value in (("dtype", spec.dtype or self.mergefile.defaults.dtype),
                           ("tokenizer_source", spec.tokenizer_source),
                           ("chat_template", spec.chat_template)):
            if value is not None:
                out[key] = value
        return out

    def _mergefile_digest(self) -> str:
        import hashlib

        return "sha256:" + hashlib.sha256(self.mergefile.text.encode()).hexdigest()

    # auditing and shipping (the logic lives in audit.py, garbage.py, export.py) ----------
    def verify(self, node: str):
        """Re-hash ``node``'s current build against its provenance and walk its chain.

        Returns:
            An ``audit.VerifyReport``: every problem, the files and stages checked.
        """
        from mergebuild.verbs.verify import verify_build

        with self.store.in_use():
            return verify_build(self.build_dir(node))

    def build_dir(self, node: str) -> Path:
        """The store directory of ``node``'s current key, even if it fails the cheap
        integrity check (so that ``verify`` can say why); else as :meth:`path`."""
        state = next(s for s in self.plan([node]) if s.name == node)
        if state.kind == "merge" and state.key and self.store.object_dir(state.key).is_dir():
            return self.store.object_dir(state.key)
        return self.path(node)

    def check(self, node: str, device: str | None = None, reporter: Reporter | None = None):
        """Rebuild ``node`` (parents from the store) into a scratch dir, never published,
        and compare every output file with the stored build (``audit.ReproReport``)."""
        from mergebuild.verbs.verify import check_reproducible

        with self.store.in_use():
            return check_reproducible(self, node, device=device, reporter=reporter)

    def collect_garbage(self, dry_run: bool = False):
        """Remove store objects no node reaches and leftovers of dead builds (see
        ``garbage``); returns a ``garbage.GcReport``."""
        from mergebuild.store.gc import collect_garbage

        with self.store.in_use() if dry_run else self.store.exclusive():
            return collect_garbage(self, dry_run=dry_run)

    def pin(self, node: str, name: str | None = None) -> tuple[str, dict[str, Any]]:
        """Keep ``node``'s current build out of ``gc``'s reach under ``name`` (default: the
        node's name), whatever later happens to the Mergefile; returns (name, record)."""
        name = name or node
        if not _PIN_NAME.match(name):
            raise MergefileError(f"invalid pin name '{name}'", node=node,
                                 hint="use letters, digits, '.', '_' and '-' (e.g. v1.0)")
        with self.store.in_use():
            state = self._current(node)
            if state.kind != "merge" or state.key is None:
                raise StoreError("is a source, not a build; only builds can be pinned",
                                 node=node, hint="pin a merge node")
            record = {"key": state.key, "digest": state.digest, "node": node,
                      "mergefile": str(self.mergefile.path), "path": str(state.path),
                      "pinned": _now()}
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

    def export(self, node: str, directory: str | Path, force: bool = False):
        """Copy ``node``'s verified build to ``directory`` (``export.ExportResult``)."""
        from mergebuild.verbs.export import export_build

        with self.store.in_use():
            return export_build(self.path(node), Path(directory), force=force, node=node)

    def push(self, node: str, repo_id: str, private: bool = False,
             revision: str | None = None) -> str:
        """Verify ``node``'s build and upload it to the Hub as ``repo_id``; the commit URL."""
        from mergebuild.verbs.export import push_build

        with self.store.in_use():
            return push_build(self.path(node), repo_id, private=private, revision=revision,
                              node=node)

    def excerpt(self, node: str) -> str:
        """The YAML of ``node`` and its ancestors: enough to rebuild it."""
        names = build_order(self.graph, [node])
        models: dict[str, Any] = {}
        for name in names:
            spec = self.mergefile.nodes[name]
            if isinstance(spec, SourceSpec):
                if not spec.implicit:
                    models[name] = {"source": _display_uri(spec, self.mergefile.directory)}
            elif isinstance(spec, MergeSpec):  # an adapted reference is written in its child
                models[name] = spec.plain()
        return yaml.safe_dump({"version": 1, "models": models}, sort_keys=False)


_ADAPTER_SUFFIX = "#adapter"
_PIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _adapter_entry(node: str) -> str:
    """The lock entry of the hub-hosted LoRA adapter of an adapted (source or merge) node."""
    return node + _ADAPTER_SUFFIX


def _adapt(state: NodeState, spec: AdaptedSpec, model: NodeState) -> None:
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


def _display_uri(spec: SourceSpec, base: Path) -> str:
    if spec.kind != "local":
        return spec.uri
    try:
        return "./" + str(Path(spec.uri).relative_to(base))
    except ValueError:
        return spec.uri


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


