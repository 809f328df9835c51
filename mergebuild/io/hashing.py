"""Content hashes: canonical-JSON keys, file digests, and the stat cache that skips re-reading."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import xxhash

_CHUNK = 8 * 2**20


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal data gives equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def recipe_key(recipe: Any) -> str:
    """xxh3-128 hex of a recipe's canonical JSON."""
    return xxhash.xxh3_128_hexdigest(canonical_json(recipe).encode())


def manifest_digest(files: dict[str, str], algorithm: str) -> str:
    """The digest of a set of files given each file's digest: ``algo:hex``."""
    text = canonical_json(dict(sorted(files.items()))).encode()
    if algorithm == "sha256":
        import hashlib

        return "sha256:" + hashlib.sha256(text).hexdigest()
    return "xxh128:" + xxhash.xxh3_128_hexdigest(text)


def file_xxh128(path: Path) -> str:
    """xxh3-128 of a file's bytes, streamed through one reused buffer (a fresh 8 MB bytes
    object per read costs its page faults: 0.45 s instead of 0.31 s for 1.8 GB cached)."""
    h = xxhash.xxh3_128()
    view = memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return "xxh128:" + h.hexdigest()


def stat_signature(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class StatCache:
    """(path, inode, size, mtime_ns) → digest, so unchanged files are never re-read.

    Kept in SQLite inside the store; several processes may share it.
    """

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection | None:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, inode INTEGER,"
                    " size INTEGER, mtime_ns INTEGER, digest TEXT)"
                )
            except sqlite3.Error:
                return None  # a read-only or broken store still works, just slower
            self._local.conn = conn
        return conn

    def digest(self, path: Path) -> str:
        """The xxh128 digest of ``path``, from the cache when its stat is unchanged."""
        path = Path(path).resolve()
        inode, size, mtime_ns = stat_signature(path)
        conn = self._conn()
        if conn is not None:
            try:
                row = conn.execute(
                    "SELECT inode, size, mtime_ns, digest FROM files WHERE path = ?", (str(path),)
                ).fetchone()
            except sqlite3.Error:
                row = None
            if row and tuple(row[:3]) == (inode, size, mtime_ns):
                return row[3]
        digest = file_xxh128(path)
        if stat_signature(path) != (inode, size, mtime_ns):
            # Changed while we read it: do not cache a digest of a moving target.
            return digest
        self._store(path, (inode, size, mtime_ns), digest)
        return digest

    def remember(self, path: Path, digest: str) -> None:
        """Record ``digest`` as the content of ``path`` as it is now (hashed while it was
        written), so the next :meth:`digest` reads nothing unless the file changes."""
        path = Path(path).resolve()
        self._store(path, stat_signature(path), digest)

    def _store(self, path: Path, signature: tuple[int, ...], digest: str) -> None:
        conn = self._conn()
        if conn is None:
            return
        try:
            conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                         (str(path), *signature, digest))
        except sqlite3.Error:
            pass
