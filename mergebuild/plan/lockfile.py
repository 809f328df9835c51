"""``Mergefile.lock``: the commit every hub source resolved to, and hub sources resolved through it.

The lock file is JSON (which is also YAML), sorted and indented so it diffs well::

    {
      "version": 1,
      "sources": {
        "base": {
          "uri": "hf://org/name@main",
          "commit": "<40-hex sha>",
          "digest": "sha256:<64-hex>",
          "files": [{"path": "config.json", "size": 612, "sha256": null, "blob_id": "<git oid>"}, ...]
        }
      }
    }

A hub-hosted LoRA adapter is locked under its node's name plus ``#adapter``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.io.atomic import write_json_atomic
from mergebuild.errors import MergefileError, StoreError
from mergebuild.sources.hub import HubResolution
from mergebuild.sources.resolve import ResolvedSource, resolve_adapter, resolve_source
from mergebuild.spec.model import AdaptedSpec, Mergefile, SourceSpec
from mergebuild.store.objects import Store

if TYPE_CHECKING:
    from mergebuild.plan.staleness import NodeState

LOCK_VERSION = 1
ADAPTER_SUFFIX = "#adapter"


def adapter_entry(node: str) -> str:
    """The lock entry of the hub-hosted LoRA adapter of an adapted (source or merge) node."""
    return node + ADAPTER_SUFFIX


class LockFile:
    """``Mergefile.lock``: the resolved commit and files of every hub source, by node name."""

    def __init__(self, entries: Mapping[str, HubResolution] | None = None) -> None:
        self._entries: dict[str, HubResolution] = dict(entries or {})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LockFile:
        """Read a lock file; a missing file is an empty lock."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls()
        except OSError as error:
            raise MergefileError(
                f"cannot read lock file ({error.strerror or error})", file=str(path)
            ) from None
        try:
            data = json.loads(text)
        except ValueError as error:
            line = getattr(error, "lineno", None)
            raise MergefileError(
                "lock file is not valid JSON",
                file=str(path),
                line=line,
                hint="delete it to resolve sources again",
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("sources"), dict):
            raise MergefileError(
                "lock file has no 'sources' table", file=str(path), hint="delete it"
            )
        if data.get("version") != LOCK_VERSION:
            raise MergefileError(
                f"lock file version {data.get('version')!r} is not {LOCK_VERSION}",
                file=str(path),
                hint="delete it",
            )
        return cls(
            {
                node: HubResolution.from_json(entry, node=node)
                for node, entry in data["sources"].items()
            }
        )

    def get(self, node: str, *, uri: str | None = None) -> HubResolution | None:
        """The locked resolution of ``node``; with ``uri``, None unless the entry was made for that URI."""
        entry = self._entries.get(node)
        if entry is None or (uri is not None and entry.uri != uri):
            return None
        return entry

    def set(self, node: str, resolution: HubResolution) -> None:
        self._entries[node] = resolution

    def nodes(self) -> list[str]:
        return sorted(self._entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": LOCK_VERSION,
            "sources": {node: self._entries[node].to_json() for node in sorted(self._entries)},
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a temporary file in the same directory, fsync, rename."""
        write_json_atomic(Path(path), self.to_json())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LockFile) and self._entries == other._entries

    def __repr__(self) -> str:
        return f"LockFile({self.nodes()!r})"


class SourceLock:
    """The lock file beside a Mergefile: what it pins, how a plan moved from it, and
    recording a plan's resolutions in it.

    Hub sources resolve from the hub and are recorded in the lock by make; with ``frozen``,
    they resolve from the lock instead (like ``cargo build --locked``) and it is never
    rewritten.
    """

    def __init__(self, mergefile: Mergefile, *, frozen: bool = False) -> None:
        self.mergefile = mergefile
        self.frozen = frozen
        self.path = mergefile.path.with_name(mergefile.path.name + ".lock")
        self._file: LockFile | None = None

    @property
    def file(self) -> LockFile:
        """The lock as last read or written (empty when there is none)."""
        if self._file is None:
            self._file = LockFile.load(self.path)
        return self._file

    def changes(self, entry: str, uri: str, src: ResolvedSource) -> list[str]:
        """How a hub source's (or hub adapter's) resolution differs from the one in the lock
        entry ``entry``, as reasons."""
        if src.kind != "hub" or not self.path.exists():
            return []
        old = self.file.get(entry)
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

    def update(self, states: list[NodeState]) -> bool:
        """Record every planned hub source's resolution in the lock; True if it was written.

        Entries of hub sources the plan did not reach are kept while the Mergefile still
        has them; entries of nodes that are gone are dropped.
        """
        if self.frozen:
            return False
        lock = LockFile()
        for name in self.file.nodes():
            is_adapter = name.endswith(ADAPTER_SUFFIX)
            spec = self.mergefile.nodes.get(name.removesuffix(ADAPTER_SUFFIX))
            if isinstance(spec, AdaptedSpec):
                uri = spec.adapter if is_adapter else None
            elif isinstance(spec, SourceSpec):
                uri = spec.adapter if is_adapter else spec.uri if spec.kind == "hub" else None
            else:
                continue
            if uri:
                entry = self.file.get(name, uri=uri)
                if entry is not None:
                    lock.set(name, entry)
        for state in states:
            if state.adapter is not None and state.adapter.kind == "hub":
                lock.set(adapter_entry(state.name), state.adapter.extra["resolution"])
            if state.source is None:
                continue
            if state.source.kind == "hub":
                lock.set(state.name, state.source.extra["resolution"])
            adapter = state.source.extra.get("adapter")
            if adapter is not None and adapter.kind == "hub":
                lock.set(adapter_entry(state.name), adapter.extra["resolution"])
        if lock == self.file and (self.path.exists() or not lock.nodes()):
            return False
        try:
            lock.save(self.path)
        except OSError as exc:
            raise StoreError(f"cannot write {self.path.name} ({exc.strerror or exc})",
                             hint=f"check the permissions of {self.path.parent}") from None
        self._file = lock
        return True


class LockedResolver:
    """Resolves each source (and each merge's LoRA) once, hub ones pinned by the lock."""

    def __init__(self, store: Store, lock: SourceLock) -> None:
        self.store = store
        self.lock = lock
        self._resolved: dict[str, ResolvedSource] = {}

    def source(self, spec: SourceSpec) -> ResolvedSource:
        if spec.name not in self._resolved:
            locked = adapter_locked = None
            if spec.kind == "hub":
                locked = self.lock.file.get(spec.name, uri=spec.uri)
            if spec.adapter is not None and spec.adapter.startswith("hf://"):
                adapter_locked = self.lock.file.get(adapter_entry(spec.name), uri=spec.adapter)
            self._resolved[spec.name] = resolve_source(spec, self.store, locked=locked,
                                                       frozen=self.lock.frozen,
                                                       lock_name=self.lock.path.name,
                                                       adapter_locked=adapter_locked)
        return self._resolved[spec.name]

    def adapter(self, spec: AdaptedSpec) -> ResolvedSource:
        """The LoRA of a ``merge+lora`` node (hub adapters pinned like adapted sources')."""
        entry = adapter_entry(spec.name)
        if entry not in self._resolved:
            locked = None
            if spec.adapter_kind == "hub":
                locked = self.lock.file.get(entry, uri=spec.adapter)
            self._resolved[entry] = resolve_adapter(spec.adapter, spec.name, self.store,
                                                    locked=locked, frozen=self.lock.frozen,
                                                    lock_name=self.lock.path.name)
        return self._resolved[entry]
