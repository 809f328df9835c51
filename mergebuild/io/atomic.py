"""Atomic file writes: a temporary file in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["fsync_directory", "write_bytes_atomic", "write_json_atomic"]


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(
    path: Path, data: bytes, *, mode: int = 0o644, before_rename: Callable[[], None] | None = None
) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the new one, never a part.

    Args:
        path: the file to write; its directory must exist.
        data: the whole new content.
        mode: permission bits of the new file.
        before_rename: called once the temporary file is durable, just before the rename
            (reliability tests stop the process there).

    Raises:
        OSError: the write failed; the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_json_atomic(
    path: Path,
    value: Any,
    *,
    indent: int | None = 2,
    trailing_newline: bool = True,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """:func:`write_bytes_atomic` of ``value`` as JSON with sorted keys (UTF-8, ASCII-escaped)."""
    text = json.dumps(value, indent=indent, sort_keys=True)
    if trailing_newline:
        text += "\n"
    write_bytes_atomic(path, text.encode("utf-8"), before_rename=before_rename)
