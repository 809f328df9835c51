"""The content-addressed store: objects by recipe key, atomic publish, per-key locks, refs.

Layout of a store directory::

    objects/<key[:2]>/<key>/   published builds (read-only Hugging Face model directories)
    tmp/<key>.<random>/        builds in progress; anything here older than its lock is garbage
    locks/<key>.lock           flock'd while a key is built, so two makes never build it twice
    refs/<mergefile-id>/<node>.json  the last build of each node of one Mergefile: key,
                               digest, recipe (for "what changed" reasons and human-facing
                               names); the id hashes the Mergefile's resolved path, so two
                               Mergefiles sharing a store never overwrite each other's records
    refs/<mergefile-id>/_mergefile.json  which Mergefile that is (gc keeps the builds of
                               every Mergefile that still exists)
    refs/<node>.json           the old layout, keyed by node name alone: still read (when its
                               ``mergefile`` is the reader's) and moved into the new one on
                               the next write
    published/<key>.json       what each object was published as: its digest and every file's
                               size and xxh128, written before the object appears; reuse,
                               parent reads, verify, export and push compare against it, so
                               an object cannot vouch for itself through its provenance.json
    quarantine/<key>.<random>/ objects found corrupt (kept for inspection; gc removes them)
    pins/<name>.json           builds kept by ``mergebuild pin`` (gc never removes them)
    scratch/check.<pid>.<random>/  ``make --check`` rebuilds, never published; gc removes
                               those whose process is gone
    use.lock                   flock'd shared by every command using objects, exclusively
                               by gc (so gc never removes what a running command uses)
    demo/                      demo models generated on first use
    state.db                   the stat cache (SQLite)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergebuild import faults
from mergebuild.errors import StoreError
from mergebuild.io.atomic import fsync_directory, write_json_atomic
from mergebuild.io.hashing import StatCache, file_xxh128
from mergebuild.io.json_limits import RECORD_MAX_BYTES, read_json_bounded
from mergebuild.provenance.integrity import quick_check
from mergebuild.provenance.statement import read_statement

USE_LOCK = "use.lock"  # shared by commands using objects, exclusive for gc


@dataclass(frozen=True)
class StoredBuild:
    key: str
    digest: str
    path: Path


@dataclass(frozen=True)
class PublishRecord:
    """What an object was published as: the store's own word on it, kept outside the object.

    ``files`` maps every file of the object (``provenance.json`` included) to its size and
    ``xxh128:<hex>`` content hash, taken while the build was written.
    """

    key: str
    digest: str
    files: dict[str, tuple[int, str]]

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "digest": self.digest,
                "files": {n: {"size": size, "xxh128": h} for n, (size, h) in
                          sorted(self.files.items())}}

    @staticmethod
    def from_json(data: Any) -> PublishRecord | None:
        try:
            files = {str(n): (int(f["size"]), str(f["xxh128"])) for n, f in data["files"].items()}
            return PublishRecord(key=str(data["key"]), digest=str(data["digest"]), files=files)
        except (KeyError, TypeError, ValueError, AttributeError):
            return None


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below root (files first, then their directories)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(dirpath))


def _make_readonly(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)


def _make_writable(root: Path) -> None:
    if not root.exists():
        return
    for dirpath, _dirnames, _filenames in os.walk(root):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, name), 0o644)


def remove_tree(root: Path) -> None:
    """Remove a (possibly read-only) directory tree."""
    _make_writable(root)
    shutil.rmtree(root, ignore_errors=True)


class Store:
    """A store directory. Creating one creates nothing on disk until something is written."""

    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.refs = self.root / "refs"
        self.demo = self.root / "demo"
        self.pins = self.root / "pins"
        self.scratch = self.root / "scratch"
        self.published = self.root / "published"
        self.quarantined = self.root / "quarantine"
        self.stat_cache = StatCache(self.root / "state.db")

    # objects -----------------------------------------------------------------------------
    def object_dir(self, key: str) -> Path:
        return self.objects / key[:2] / key

    def lookup(self, key: str) -> StoredBuild | None:
        """The published build of ``key`` if it exists and is what was published (see
        :meth:`problem`); None otherwise."""
        path = self.object_dir(key)
        if self.problem(key) is not None:
            return None
        record = self.read_published(key)
        assert record is not None
        return StoredBuild(key=key, digest=record.digest, path=path)

    def problem(self, key: str) -> str | None:
        """Why the object of ``key`` cannot be used, or None when it is sound.

        Cheap but real: the object must have a publish record whose digest its
        ``provenance.json`` states, every file its size, and every file whose stat signature
        (inode, size, mtime) changed since it was hashed must hash to the recorded xxh128
        (the stat cache re-reads only those). A same-size edit through the file system
        changes the signature and is caught; ``verify`` re-hashes everything.
        """
        path = self.object_dir(key)
        try:  # the statement without its upstream chain: a lookup's cost is not the depth's
            meta = read_statement(path, upstream=False)
        except StoreError:
            return "missing" if not path.exists() else "no readable provenance.json"
        try:
            internal = meta["predicate"]["buildDefinition"]["internalParameters"]
            digest = internal["digest"]
            if internal["key"] != key:
                return f"provenance.json names another key ({str(internal['key'])[:12]})"
        except (KeyError, TypeError):
            return "provenance.json is not a build statement"
        record = self.read_published(key)
        if record is None:
            return "no publish record in the store"
        if record.digest != digest:
            return (f"provenance.json says {digest[:19]}, but the store published "
                    f"{record.digest[:19]}")
        problems = quick_check(path)
        if problems:  # a missing, resized or unexpected file
            return str(problems[0])
        return self.content_problem(path, record)

    def content_problem(self, path: Path, record: PublishRecord) -> str | None:
        """The first file of ``path`` whose bytes are not ``record``'s (sizes, then the stat
        cache's xxh128, which re-reads only files whose signature changed)."""
        on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
        for extra in sorted(on_disk - set(record.files)):
            if not Path(extra).name.startswith("."):
                return f"{extra}: not published"
        for name, (size, xxh) in sorted(record.files.items()):
            file = path / name
            try:
                if file.stat().st_size != size:
                    return f"{name}: size differs from what was published"
                if self.stat_cache.digest(file) != xxh:
                    return f"{name}: content differs from what was published"
            except OSError:
                return f"{name}: missing"
        return None

    def read_published(self, key: str) -> PublishRecord | None:
        data = _read_json(self.published / f"{key}.json")
        record = PublishRecord.from_json(data) if isinstance(data, dict) else None
        return record if record is not None and record.key == key else None

    def discard(self, key: str) -> None:
        """Remove a published object that failed its integrity check."""
        path = self.object_dir(key)
        if path.exists():
            with contextlib.suppress(OSError):
                self.retire(path, "corrupt")

    def quarantine(self, key: str) -> Path | None:
        """Move a corrupt object aside in one rename (``quarantine/<key>.<random>``, kept
        for inspection until ``gc``), so the next ``make`` rebuilds it; its location, or
        None if there was nothing to move."""
        path = self.object_dir(key)
        if not path.exists():
            return None
        self._mkdir(self.quarantined)
        target = self.quarantined / f"{key}.{secrets.token_hex(4)}"
        try:
            _make_writable(path)
            os.rename(path, target)
        except OSError as exc:
            raise self.os_error(exc, f"cannot move the corrupt object {key[:12]} aside") from None
        return target

    def retire(self, path: Path, tag: str) -> None:
        """Take a published object out of ``objects/`` in one rename, then delete it: nothing
        ever sees half an object, and a process killed in between leaves only a dead temp dir
        (``tmp/<key>.<tag>.<random>``) for ``gc``. Raises OSError if it cannot be moved."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        trash = self.tmp / f"{path.name}.{tag}.{secrets.token_hex(4)}"
        _make_writable(path)  # moving a directory to another parent needs write access to it
        os.rename(path, trash)
        remove_tree(trash)

    # building ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the per-key build lock; blocks (calling ``on_wait`` once) while another holds it."""
        self._mkdir(self.locks)
        path = self.locks / f"{key}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self.os_error(exc, f"cannot lock {key[:12]} for building") from None
        try:
            _flock_waiting(fd, fcntl.LOCK_EX, on_wait)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            faults.point("store.lock_acquired")
            yield
        finally:
            os.close(fd)  # closing releases the flock

    @contextlib.contextmanager
    def in_use(self, on_wait: Callable[[], None] | None = None, create: bool = False
               ) -> Iterator[None]:
        """Hold the store's shared use lock while a command reads or publishes objects
        (make, make --check, verify, export, push): ``gc`` takes it exclusively, so it never
        removes an object that a running command has just published, reused or is reading.
        Blocks (calling ``on_wait`` once) while a ``gc`` runs. A store that does not exist
        yet (unless ``create``: make is about to write it) has nothing to protect and is not
        locked; in one this process cannot write (a read-only mount, another user's store)
        the lock is taken on a read-only descriptor (flock needs no write access), so a
        ``gc`` run by whoever can write it still waits for this reader."""
        fd = self._open_use_lock(create=create)
        if fd is None:
            yield
            return
        try:
            _flock_waiting(fd, fcntl.LOCK_SH, on_wait)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the use lock alone (``gc``); a StoreError at once if any command holds it."""
        fd = self._open_use_lock(create=False)
        if fd is None:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(
                    f"another mergebuild (make, verify, export or push) is using the store "
                    f"{self.root}; nothing was removed",
                    hint="run gc again when it has finished") from None
            yield
        finally:
            os.close(fd)

    def _open_use_lock(self, create: bool) -> int | None:
        if not self.root.is_dir():
            if not create:
                return None
            with contextlib.suppress(OSError):
                self.root.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(self.root / USE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            pass
        try:  # a store this process cannot write: a shared lock needs only to read the file
            return os.open(self.root / USE_LOCK, os.O_RDONLY)
        except OSError:
            return None  # no lock file, and none can be made: nobody can remove objects here

    def require_writable(self, what: str) -> None:
        """A one-line StoreError (the store, why, what to do) unless a file can be created
        in the store: ``make`` asks before building anything, instead of failing on the
        first lock or temp dir it cannot create."""
        probe = self.root / f".write-probe.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            probe.unlink()
        except OSError as exc:
            raise self.os_error(exc, what) from None

    def new_tmp(self, key: str) -> Path:
        self._mkdir(self.tmp)
        path = self.tmp / f"{key}.{os.getpid()}.{secrets.token_hex(4)}"
        path.mkdir()
        return path

    def publish(self, tmp_dir: Path, key: str, digest: str,
                hashes: dict[str, str] | None = None) -> Path:
        """fsync the finished build, record what it is (``published/<key>.json``) and rename
        it into place; it becomes read-only.

        ``hashes``: ``xxh128:<hex>`` of files hashed while they were written (the weights);
        every other file is hashed here. An existing sound object of the same digest (a
        forced rebuild that came out identical) stays where it is, so a make reading it as
        a parent is never disturbed; the new build is dropped.
        """
        final = self.object_dir(key)
        try:
            faults.point("store.before_fsync")
            fsync_tree(tmp_dir)
            _make_readonly(tmp_dir)
            files = {}
            for file in sorted(p for p in tmp_dir.rglob("*") if p.is_file()):
                name = file.relative_to(tmp_dir).as_posix()
                xxh = (hashes or {}).get(name) or file_xxh128(file)
                files[name] = (file.stat().st_size, xxh)
            record = PublishRecord(key=key, digest=digest, files=files)
            self._mkdir(final.parent)
            if final.exists():
                existing = self.read_published(key)
                if (existing is not None and existing.digest == digest
                        and self.problem(key) is None):
                    self.abandon(tmp_dir)
                    return final
                # A corrupt leftover (lookup failed under the lock), or a rebuild that
                # came out different: replace it.
                self.discard(key)
            self._mkdir(self.published)
            self._write_record(self.published / f"{key}.json", record.as_json(),
                               f"cannot record build {key[:12]}")
            faults.point("store.before_rename")
            os.rename(tmp_dir, final)
            faults.point("store.after_rename")
            fsync_directory(final.parent)
        except OSError as exc:
            raise self.os_error(exc, f"cannot publish build {key[:12]}") from None
        for name, (_size, xxh) in files.items():  # the next lookup reads nothing
            with contextlib.suppress(OSError):
                self.stat_cache.remember(final / name, xxh)
        return final

    def abandon(self, tmp_dir: Path) -> None:
        remove_tree(tmp_dir)

    # refs --------------------------------------------------------------------------------
    def refs_of(self, mergefile: Path) -> Refs:
        """The records of ``mergefile``'s builds (its identity: its resolved path)."""
        return Refs(self, Path(mergefile).resolve())

    def ref_sets(self) -> Iterator[tuple[Path | None, list[dict[str, Any]]]]:
        """Every Mergefile's records: (its path, or None if unknown; its records), the old
        flat layout as one set per Mergefile it names."""
        if not self.refs.is_dir():
            return
        flat: dict[Path | None, list[dict[str, Any]]] = {}
        for path in sorted(self.refs.iterdir()):
            if path.is_dir():
                owner = _read_json(path / MERGEFILE_RECORD)
                mergefile = owner.get("mergefile") if isinstance(owner, dict) else None
                records = [r for r in map(_read_json, sorted(path.glob("*.json")))
                           if isinstance(r, dict) and r.get("key")]
                yield (Path(mergefile) if isinstance(mergefile, str) else None), records
            elif path.suffix == ".json":
                record = _read_json(path)
                if isinstance(record, dict) and record.get("key"):
                    named = record.get("mergefile")
                    flat.setdefault(Path(named) if isinstance(named, str) else None,
                                    []).append(record)
        yield from flat.items()

    def _write_record(self, path: Path, record: dict[str, Any], what: str,
                      node: str | None = None, fault: str | None = None) -> None:
        """Write JSON beside ``path`` and rename it into place (readers see old or new)."""
        try:
            write_json_atomic(path, record, indent=1, trailing_newline=False,
                              before_rename=(lambda: faults.point(fault)) if fault else None)
        except OSError as exc:
            raise self.os_error(exc, what, node=node) from None

    # pins --------------------------------------------------------------------------------
    def read_pins(self) -> dict[str, dict[str, Any]]:
        """Every pin: name → its record (key, digest, node, mergefile, pinned)."""
        if not self.pins.is_dir():
            return {}
        pins = {}
        for path in sorted(self.pins.glob("*.json")):
            record = _read_json(path)
            if isinstance(record, dict) and record.get("key"):
                pins[path.stem] = record
        return pins

    def write_pin(self, name: str, record: dict[str, Any]) -> None:
        self._mkdir(self.pins)
        self._write_record(self.pins / f"{name}.json", record, f"cannot write pin '{name}'")

    def remove_pin(self, name: str) -> bool:
        try:
            (self.pins / f"{name}.json").unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self.os_error(exc, f"cannot remove pin '{name}'") from None
        return True

    # maintenance -------------------------------------------------------------------------
    def iter_objects(self) -> Iterator[Path]:
        if not self.objects.is_dir():
            return
        for prefix in sorted(self.objects.iterdir()):
            if prefix.is_dir():
                yield from sorted(p for p in prefix.iterdir() if p.is_dir())

    def dead_tmp_dirs(self) -> list[Path]:
        """Temp dirs whose build lock is not held (their process died or was killed)."""
        dead: list[Path] = []
        if not self.tmp.is_dir():
            return dead
        for path in sorted(self.tmp.iterdir()):
            key = path.name.split(".", 1)[0]
            lock = self.locks / f"{key}.lock"
            retired = ".corrupt." in path.name or ".gc." in path.name
            if retired or not lock.exists() or not lock_held(lock):
                dead.append(path)
        return dead

    def quarantined_objects(self) -> list[Path]:
        """Corrupt objects moved aside by :meth:`quarantine`."""
        if not self.quarantined.is_dir():
            return []
        return sorted(p for p in self.quarantined.iterdir() if p.is_dir())

    def orphan_records(self) -> list[Path]:
        """Publish records whose object is gone (removed by gc or moved aside)."""
        if not self.published.is_dir():
            return []
        return [p for p in sorted(self.published.glob("*.json"))
                if not self.object_dir(p.stem).exists()]

    def dead_scratch_dirs(self) -> list[Path]:
        """Scratch directories of checks whose process is gone (left by a killed check)."""
        if not self.scratch.is_dir():
            return []
        dead = []
        for path in sorted(self.scratch.iterdir()):
            parts = path.name.split(".")
            pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
            if pid is None or not _alive(pid):
                dead.append(path)
        return dead

    # scratch builds ----------------------------------------------------------------------
    @contextlib.contextmanager
    def scratch_store(self) -> Iterator[Store]:
        """This store, except that builds stay in a fresh scratch directory (removed on
        exit): nothing is published and no ref is written; parents are read from the real
        objects."""
        scratch = self.scratch / f"check.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            yield _ScratchStore(self.root, scratch)
        finally:
            remove_tree(scratch)

    # helpers -----------------------------------------------------------------------------
    def _mkdir(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.os_error(exc, f"cannot create {path}") from None

    def os_error(self, exc: OSError, what: str, node: str | None = None) -> StoreError:
        # EFBIG: a file-size limit (ulimit -f, quota-like) is a full disk to the user.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return StoreError(f"{what}: no space left on the device holding {self.root}",
                              node=node, hint="free space or pass --cache-dir on a larger disk")
        if exc.errno == errno.EROFS:
            return StoreError(f"{what}: the store {self.root} is on a read-only file system",
                              node=node, hint="pass --cache-dir DIR on a writable disk, or "
                                              "remount the store read-write")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return StoreError(f"{what}: permission denied in the store {self.root}", node=node,
                              hint="pass --cache-dir DIR where you can write, or give this "
                                   "user write access to the store")
        return StoreError(f"{what}: {exc.strerror or exc}", node=node)


MERGEFILE_RECORD = "_mergefile.json"  # node names start with a letter or digit, never "_"


def mergefile_id(mergefile: Path) -> str:
    """A Mergefile's identity in the store: a hash of its resolved path."""
    return hashlib.sha256(str(Path(mergefile).resolve()).encode()).hexdigest()[:24]


# A file name keeps a node name's letters, digits and "._-" (str.isalnum's letters and digits:
# \w is those and "_"), everything else becoming "_".
_UNSAFE_IN_NAME = re.compile(r"[^\w.-]")


def _safe_name(node: str) -> str:
    return _UNSAFE_IN_NAME.sub("_", node)


class Refs:
    """One Mergefile's records in a store: the last build of each of its merge nodes.

    Reads fall back to the old flat ``refs/<node>.json`` when it names this Mergefile (or no
    Mergefile, as the oldest records do); writes go to ``refs/<id>/`` and remove that old
    record, so a store migrates node by node as it is used.
    """

    def __init__(self, store: Store, mergefile: Path):
        self.store = store
        self.mergefile = mergefile
        self.dir = store.refs / mergefile_id(mergefile)
        self._names: set[str] | None = None
        self._legacy_names: set[str] | None = None

    def _path(self, node: str) -> Path:
        return self.dir / f"{_safe_name(node)}.json"

    def _legacy(self, node: str) -> Path:
        return self.store.refs / f"{_safe_name(node)}.json"

    def _known(self) -> set[str]:
        """The file names in this Mergefile's refs dir, listed once: a plan of 10,000 nodes
        then opens only the records that exist."""
        if self._names is None:
            self._names = _listing(self.dir)
        return self._names

    def _known_legacy(self) -> set[str]:
        """The names in the refs dir itself (old flat records), listed once, as :meth:`_known`."""
        if self._legacy_names is None:
            self._legacy_names = _listing(self.store.refs)
        return self._legacy_names

    def read(self, node: str) -> dict[str, Any] | None:
        """``node``'s record; None when there is none, or when the file is not a record (not
        JSON, nested too deeply, the wrong shape): bookkeeping to rewrite, not to crash on."""
        name = f"{_safe_name(node)}.json"
        if name in self._known():
            record = _read_json(self.dir / name)
            if _is_record(record):
                return record
        if name not in self._known_legacy():
            return None
        record = _read_json(self.store.refs / name)
        if _is_record(record) and self._ours(record):
            return record
        return None

    def migrated(self, node: str) -> bool:
        """Whether ``node``'s record is in this Mergefile's own directory (not the old layout)."""
        return f"{_safe_name(node)}.json" in self._known()

    def _ours(self, record: dict[str, Any]) -> bool:
        named = record.get("mergefile")
        if not isinstance(named, str):
            return True  # the oldest records named no Mergefile: they were ours to read
        try:
            return Path(named).resolve() == self.mergefile
        except (OSError, RuntimeError):
            return False

    def write(self, node: str, record: dict[str, Any]) -> None:
        self.store._mkdir(self.dir)
        if MERGEFILE_RECORD not in self._known():
            self.store._write_record(self.dir / MERGEFILE_RECORD,
                                     {"mergefile": str(self.mergefile)},
                                     f"cannot record the build of '{node}'", node=node)
            self._known().add(MERGEFILE_RECORD)
        path = self._path(node)
        self.store._write_record(path, {**record, "mergefile": str(self.mergefile)},
                                 f"cannot record the build of '{node}'", node=node,
                                 fault="store.ref_tmp_written")
        self._known().add(path.name)
        legacy = self._legacy(node)
        old = _read_json(legacy)
        if isinstance(old, dict) and self._ours(old):
            with contextlib.suppress(OSError):
                legacy.unlink()
                self._known_legacy().discard(legacy.name)


class _ScratchRefs(Refs):
    def write(self, node: str, record: dict[str, Any]) -> None:
        return None


class _ScratchStore(Store):
    """A store whose builds stay where they were built (see ``Store.scratch_store``)."""

    def __init__(self, root: Path, scratch: Path):
        super().__init__(root)
        self.tmp = scratch

    def publish(self, tmp_dir: Path, key: str, digest: str,
                hashes: dict[str, str] | None = None) -> Path:
        return tmp_dir

    def refs_of(self, mergefile: Path) -> Refs:
        return _ScratchRefs(self, Path(mergefile).resolve())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flock_waiting(fd: int, mode: int, on_wait: Callable[[], None] | None) -> None:
    """flock ``fd`` in ``mode``; if that has to wait, call ``on_wait`` once, then block."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        if on_wait:
            on_wait()
        fcntl.flock(fd, mode)


def lock_held(lock: Path) -> bool:
    """Whether some process holds the flock on ``lock``."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _listing(directory: Path) -> set[str]:
    """The names in ``directory``; none when it is missing or unreadable."""
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


def _is_record(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("key"), str)
            and (record.get("digest") is None or isinstance(record.get("digest"), str)))


def read_record(path: Path) -> Any:
    """A small JSON record of the store (a ref, a pin, a lock note); ``None`` when it is
    missing or is not bounded, valid JSON."""
    return _read_json(path)


def _read_json(path: Path) -> Any:
    try:
        return read_json_bounded(path, RECORD_MAX_BYTES)
    except (OSError, ValueError):
        return None
