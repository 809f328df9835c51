"""Garbage collection of a store: what no live build is kept for, and what dead builds left.

What ``gc`` keeps (the roots), so that it never removes anything the Mergefile can reach:

- the keys it is given: every merge node's *current* key and the key each node still in
  the Mergefile was last built as (its record in ``refs/<mergefile-id>/``), worked out by
  the planner;
- every build recorded by *another* Mergefile that still exists (a shared store via
  ``$MERGEBUILD_CACHE`` or ``--cache-dir``): each Mergefile's records live apart, keyed by
  its resolved path, so none overwrites another's; a Mergefile that no longer exists (or
  moved) is not live, and its records keep nothing;
- pinned builds (``mergebuild pin``), whatever became of their node or Mergefile.

What it removes: every other object (and its publish record), temp dirs of interrupted
builds (their lock is free), corrupt objects moved aside to ``quarantine/``, scratch dirs of
killed ``make --check`` runs, lock files nobody holds (untouched for
``LOCK_GRACE_SECONDS``), and demo model directories the current generator does not write.

The caller works out the keys before anything is removed: if any node cannot be planned
(a source is missing, the hub is unreachable), it cannot know what is reachable.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mergebuild.store.objects import Store, lock_held, remove_tree

LOCK_GRACE_SECONDS = 600  # a lock file used this recently is left alone (see _old_free_locks)


@dataclass(frozen=True)
class Garbage:
    """One thing ``gc`` removes: ``kind`` is object, record, temp, quarantine, scratch, lock
    or demo."""

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


def reachable_keys(store: Store, keep: set[str], mergefile: Path) -> set[str]:
    """``keep`` (the keys ``mergefile`` reaches), the pinned keys, and every key recorded by
    a Mergefile that still exists (``mergefile``'s own records are in ``keep`` when they
    matter: for nodes it still has). A record whose Mergefile is unknown is kept too: gc
    cannot tell that it is dead."""
    keys = set(keep) | {str(pin["key"]) for pin in store.read_pins().values()}
    ours = mergefile.resolve()
    for owner, records in store.ref_sets():
        if owner is not None and (_same_file(owner, ours) or not owner.is_file()):
            continue
        keys.update(str(record["key"]) for record in records)
    return keys


def _same_file(path: Path, resolved: Path) -> bool:
    try:
        return path.resolve() == resolved
    except (OSError, RuntimeError):
        return False


def find_garbage(store: Store, keep: set[str], *, mergefile: Path, live_demo: set[str],
                 lock_grace: float = LOCK_GRACE_SECONDS,
                 why_not_kept: Mapping[str, str] | None = None) -> tuple[list[Garbage], int]:
    """Everything ``gc`` would remove, and how many objects it keeps.

    Args:
        keep: the keys ``mergefile`` reaches (see the module docstring).
        live_demo: the names of the demo directories the current generator writes.
        why_not_kept: {key: why} for objects the Mergefile names but does not keep (a
            variant that lost its sweep's selection); the rest are "not reachable".
    """
    why_not_kept = why_not_kept or {}
    keep = reachable_keys(store, keep, mergefile)
    garbage: list[Garbage] = []
    kept = 0
    for path in store.iter_objects():
        if path.name in keep:
            kept += 1
        else:
            garbage.append(Garbage(path, "object", _tree_size(path), why_not_kept.get(
                path.name, "not reachable from the Mergefile")))
    for path in store.dead_tmp_dirs():
        garbage.append(Garbage(path, "temp", _tree_size(path), "left by an interrupted build"))
    removed = {g.path.name for g in garbage if g.kind == "object"}
    orphans = set(store.orphan_records())
    for path in sorted(store.published.glob("*.json")) if store.published.is_dir() else ():
        if path.stem in removed or path in orphans:
            garbage.append(Garbage(path, "record", _tree_size(path),
                                   "publish record of a removed object"))
    for path in store.quarantined_objects():
        garbage.append(Garbage(path, "quarantine", _tree_size(path),
                               "corrupt object moved aside by make"))
    for path in store.dead_scratch_dirs():
        garbage.append(Garbage(path, "scratch", _tree_size(path),
                               "left by an interrupted make --check"))
    for path in _old_demo_dirs(store, live_demo):
        garbage.append(Garbage(path, "demo", _tree_size(path),
                               "demo models of an older generator"))
    for path in _old_free_locks(store, lock_grace):
        garbage.append(Garbage(path, "lock", _tree_size(path), "lock nobody holds"))
    return garbage, kept


def collect_garbage(store: Store, keep: set[str], *, mergefile: Path, live_demo: set[str],
                    dry_run: bool = False, lock_grace: float = LOCK_GRACE_SECONDS,
                    why_not_kept: Mapping[str, str] | None = None) -> GcReport:
    """Remove (or with ``dry_run`` only list) everything :func:`find_garbage` finds.

    The caller holds the store's use lock, exclusively unless ``dry_run``.
    """
    garbage, kept = find_garbage(store, keep, mergefile=mergefile, live_demo=live_demo,
                                 lock_grace=lock_grace, why_not_kept=why_not_kept)
    if not dry_run:
        for item in garbage:
            _remove(store, item)
        _remove_empty_prefixes(store)
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


def _old_demo_dirs(store: Store, live: set[str]) -> list[Path]:
    if not store.demo.is_dir():
        return []
    return [p for p in sorted(store.demo.iterdir())
            if p.is_dir() and p.name not in live and not p.name.startswith(".")]


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
