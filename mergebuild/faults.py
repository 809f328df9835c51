"""Named fault-injection points for the reliability tests; inert unless MERGEBUILD_FAULT is set.

The engine, writer, store and project call ``faults.point("<name>")`` at the places where a
crash or an outside change would hurt most (mid tensor write, before fsync, between publish
and the ref write, ...). Normally that call is one module-level ``None`` check and returns.

``MERGEBUILD_FAULT=<point>:<n>[:<action>]`` arms one point: its ``n``-th hit (1-based, counted
in this process) performs ``action``:

    kill        SIGKILL this process (the default)
    int         SIGINT this process (Ctrl-C: KeyboardInterrupt in the main thread)
    term        SIGTERM this process
    append=P    append one byte to file P (a parent changing size while it is read)
    flip=P      flip the last byte of file P in place (same size, new mtime)
    sleep=S     sleep S seconds (widens a race window, e.g. while holding a build lock)
    hold=P      if file P exists, take it (rename it to P.<pid>: one process of many wins) and
                block until killed: the test kills that pid, as a worker dies mid-build; a
                retry in a new process finds nothing to take and carries on

Every point is listed in ``POINTS``; ``tests/test_faults.py`` kills a make at each of them.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = {
    "sources.digest": "after hashing one file of a local source (planning)",
    "store.lock_acquired": "holding a node's build lock, before the second lookup",
    "engine.start": "at the start of a build, before any parent is opened",
    "engine.open_parent": "after opening one parent's safetensors headers",
    "engine.read_tensor": "after loading one parent tensor (mmap)",
    "engine.computed": "after merging one tensor, before handing it to the writer",
    "writer.mid_tensor": "in the writer thread, half-way through one tensor's bytes",
    "writer.before_fsync": "every tensor written, before the shards are fsync'd",
    "engine.after_finish": "shards closed and hashed, before the parents are re-stat'd",
    "engine.support_file": "after copying one config/tokenizer file",
    "provenance.card_written": "README.md written, provenance.json not yet",
    "provenance.written": "provenance.json written, before publish",
    "store.before_fsync": "publish: before the build directory is fsync'd",
    "store.before_rename": "publish: fsync'd and read-only, before the rename into objects/",
    "store.after_rename": "publish: renamed into objects/, before the directory fsync",
    "project.before_ref": "published, before the node's ref is written",
    "store.ref_tmp_written": "ref written to its temp name, before the atomic replace",
    "project.node_done": "a node fully recorded, before the next node starts",
}

_lock = threading.Lock()


class _Plan:
    def __init__(self, spec: str):
        parts = spec.split(":", 2)
        if len(parts) < 2 or parts[0] not in POINTS or not parts[1].isdigit():
            raise ValueError(
                f"MERGEBUILD_FAULT={spec!r}: expected <point>:<n>[:<action>] with a point from "
                f"mergebuild.faults.POINTS"
            )
        self.point, self.n = parts[0], int(parts[1])
        self.action = parts[2] if len(parts) > 2 else "kill"
        self.hits = 0


def _load(spec: str | None) -> _Plan | None:
    return _Plan(spec) if spec else None


_PLAN: _Plan | None = _load(os.environ.get("MERGEBUILD_FAULT"))
ARMED = _PLAN is not None  # for call sites that must do extra work to offer a point


def point(name: str) -> None:
    """A named place where a test may inject a fault; free when no fault is armed."""
    if _PLAN is None:
        return
    _hit(_PLAN, name)


def _hit(plan: _Plan, name: str) -> None:
    if name != plan.point:
        return
    with _lock:
        plan.hits += 1
        if plan.hits != plan.n:
            return
    action = plan.action
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "int":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action.startswith("append="):
        with open(action.split("=", 1)[1], "ab") as f:
            f.write(b"\0")
    elif action.startswith("flip="):
        with open(action.split("=", 1)[1], "r+b") as f:
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
            f.seek(-1, os.SEEK_END)
            f.write(bytes([last[0] ^ 0xFF]))
    elif action.startswith("sleep="):
        import time

        time.sleep(float(action.split("=", 1)[1]))
    elif action.startswith("hold="):
        import time

        path = action.split("=", 1)[1]
        try:
            os.rename(path, f"{path}.{os.getpid()}")
        except FileNotFoundError:
            return  # taken by another process, or never armed
        while True:
            time.sleep(1)
    else:
        raise ValueError(f"MERGEBUILD_FAULT: unknown action {action!r}")
