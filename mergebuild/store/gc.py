"""Garbage collection of a store: what no current node can reach, and what dead builds left.

What ``gc`` keeps (the roots), so that it never removes anything the Mergefile can reach:

- the object of every merge node's *current* key (planned over all nodes of the Mergefile);
- the object each node still in the Mergefile was last built as (``refs/<node>.json``), so
  editing a knob and running ``gc`` before ``make`` does not throw the last build away;
- the objects recorded in refs by *another* Mergefile that still exists (a shared store
  via ``$MERGEBUILD_CACHE`` or ``--cache-dir``);
- pinned builds (``mergebuild pin``), whatever became of their node or Mergefile.

What it removes: every other object, temp dirs of interrupted builds (their lock is free),
scratch dirs of killed ``make --check`` runs, lock files nobody holds (untouched for
``LOCK_GRACE_SECONDS``), and demo model directories of an older demo generator.

If any node cannot be planned (a source is missing, the hub is unreachable), ``gc`` stops
before removing anything: without every current key it cannot know what is reachable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergebuild.verbs.verify import scratch_dirs
from mergebuild.errors import MergebuildError, StoreError
from mergebuild.spec.model import MergeSpec
from mergebuild.store.objects import Store, lock_held, remove_tree

if TYPE_CHECKING:
    from mergebuild.api import Project

LOCK_GRACE_SECONDS = 600  # a lock file used this recently is left alone (see _old_free_locks)


@dataclass(frozen=True)
class Garbage:
    """One thing ``gc`` removes: ``kind`` is object, temp, scratch, lock or demo."""

    path: Path
    kind: str
    size: int
    why: str


@dataclass(frozen=True)
class GcReport:
    removed: tuple[Garbage, ...]
    kept: int  # objects kept as reachable
    dry_run: bool

    @property
    def bytes_freed(self) -> int:
        return sum(g.size for g in self.removed)


def reachable_keys(project: Project) -> set[str]:
    """The keys whose objects ``gc`` keeps (see the module docstring)."""
    try:
        states = project.plan(list(project.mergefile.nodes))
    except MergebuildError as exc:
        raise StoreError(f"gc cannot work out what is reachable: {exc}; nothing was removed",
                         hint="fix the Mergefile or make its sources available") from None
    keys = {s.key for s in states if s.kind == "merge" and s.key}
    for name, spec in project.mergefile.nodes.items():
        ref = project.store.read_ref(name)
        if isinstance(spec, MergeSpec) and ref and ref.get("key"):
            keys.add(str(ref["key"]))
    keys |= {str(pin["key"]) for pin in project.store.read_pins().values()}
    ours = project.mergefile.path.resolve()
    refs = project.store.refs
    for path in sorted(refs.glob("*.json")) if refs.is_dir() else ():
        record = _read_json(path)
        if not isinstance(record, dict) or not record.get("key"):
            continue
        other = record.get("mergefile")
        if other and Path(other).resolve() != ours and Path(other).is_file():
            keys.add(str(record["key"]))
    return keys


def find_garbage(project: Project, *, lock_grace: float = LOCK_GRACE_SECONDS
                 ) -> tuple[list[Garbage], int]:
    """Everything ``gc`` would remove, and how many objects it keeps."""
    store = project.store
    keep = reachable_keys(project)
    garbage: list[Garbage] = []
    kept = 0
    for path in store.iter_objects():
        if path.name in keep:
            kept += 1
        else:
            garbage.append(Garbage(path, "object", _tree_size(path),
                                   "not reachable from the Mergefile"))
    for path in store.dead_tmp_dirs():
        garbage.append(Garbage(path, "temp", _tree_size(path), "left by an interrupted build"))
    for path in scratch_dirs(store):
        garbage.append(Garbage(path, "scratch", _tree_size(path),
                               "left by an interrupted make --check"))
    for path in _old_demo_dirs(store):
        garbage.append(Garbage(path, "demo", _tree_size(path),
                               "demo models of an older generator"))
    for path in _old_free_locks(store, lock_grace):
        garbage.append(Garbage(path, "lock", _tree_size(path), "lock nobody holds"))
    return garbage, kept


def collect_garbage(project: Project, *, dry_run: bool = False,
                    lock_grace: float = LOCK_GRACE_SECONDS) -> GcReport:
    """Remove (or with ``dry_run`` only list) everything :func:`find_garbage` finds.

    Example:
        >>> report = collect_garbage(Project("Mergefile"), dry_run=True)
        >>> report.bytes_freed
    """
    garbage, kept = find_garbage(project, lock_grace=lock_grace)
    if not dry_run:
        for item in garbage:
            _remove(project.store, item)
        _remove_empty_prefixes(project.store)
    return GcReport(removed=tuple(garbage), kept=kept, dry_run=dry_run)


def _remove(store: Store, item: Garbage) -> None:
    try:
        if item.kind == "lock":
            _unlink_if_free(item.path)
        elif item.kind == "object":
            store.retire(item.path, "gc")
        elif item.path.is_dir():
            remove_tree(item.path)
        else:
            item.path.unlink(missing_ok=True)
    except OSError as exc:
        raise store.os_error(exc, f"cannot remove {item.path}") from None


def _unlink_if_free(lock: Path) -> None:
    # Unlink while holding the flock, so a make that holds it is never robbed of it.
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return
    else:
        lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _old_free_locks(store: Store, grace: float) -> list[Path]:
    # A recent lock file may be between another make's open() and flock(); unlinking it
    # then would let two makes lock different files for one key. Old and free is safe.
    if not store.locks.is_dir():
        return []
    now = time.time()
    old = []
    for path in sorted(store.locks.glob("*.lock")):
        try:
            if now - path.stat().st_mtime < grace or lock_held(path):
                continue
        except OSError:
            continue
        old.append(path)
    return old


def _old_demo_dirs(store: Store) -> list[Path]:
    from mergebuild.sources.demo import DEMO_ADAPTERS
    from mergebuild.spec.model import SourceSpec
    from mergebuild.sources.resolve import DEMO_MODELS, resolve_demo_adapter, resolve_source

    if not store.demo.is_dir():
        return []
    current = {
        Path(resolve_source(SourceSpec(name=n, uri=f"demo://{n}", line=0), store)
             .extra["demo_root"]).name
        for n in DEMO_MODELS
    } | {Path(resolve_demo_adapter(f"demo://{n}", n, store).extra["demo_root"]).name
         for n in DEMO_ADAPTERS}
    return [p for p in sorted(store.demo.iterdir())
            if p.is_dir() and p.name not in current and not p.name.startswith(".")]


def _remove_empty_prefixes(store: Store) -> None:
    if not store.objects.is_dir():
        return
    for prefix in store.objects.iterdir():
        if prefix.is_dir() and not any(prefix.iterdir()):
            with contextlib.suppress(OSError):  # a make published into it meanwhile
                prefix.rmdir()


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
