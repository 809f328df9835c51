"""The store: atomic read-only publish, per-key locks, dead temp dirs, error mapping."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from mergebuild.errors import StoreError
from mergebuild.io.hashing import StatCache, file_xxh128
from mergebuild.store.objects import Store


def test_publish_renames_and_makes_read_only(tmp_path):
    store = Store(tmp_path / "cache")
    tmp = store.new_tmp("ab" * 16)
    (tmp / "config.json").write_text("{}")
    final = store.publish(tmp, "ab" * 16, "sha256:" + "0" * 64)
    assert final == store.object_dir("ab" * 16) and not tmp.exists()
    assert not os.access(final / "config.json", os.W_OK) or os.geteuid() == 0
    assert oct((final / "config.json").stat().st_mode & 0o777) == "0o444"
    # The store's own record of what was published, outside the object.
    record = store.read_published("ab" * 16)
    assert record is not None and record.digest == "sha256:" + "0" * 64
    assert record.files == {"config.json": (2, xxhash_of(b"{}"))}


def xxhash_of(data: bytes) -> str:
    import xxhash

    return "xxh128:" + xxhash.xxh3_128_hexdigest(data)


def test_lock_serialises_builders_of_one_key(tmp_path):
    store = Store(tmp_path / "cache")
    events: list[str] = []
    waited = threading.Event()

    def builder(name: str) -> None:
        with store.lock("k" * 32, on_wait=waited.set):
            events.append(f"{name} in")
            time.sleep(0.2)
            events.append(f"{name} out")

    threads = [threading.Thread(target=builder, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert events in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
    assert waited.is_set()


def test_dead_tmp_dirs_are_those_without_a_held_lock(tmp_path):
    store = Store(tmp_path / "cache")
    dead = store.new_tmp("d" * 32)
    with store.lock("l" * 32):
        live = store.new_tmp("l" * 32)
        assert store.dead_tmp_dirs() == [dead]
    assert sorted(store.dead_tmp_dirs()) == sorted([dead, live])


def test_full_disk_maps_to_one_line_store_error(tmp_path):
    store = Store(tmp_path / "cache")
    err = store.os_error(OSError(errno.ENOSPC, "No space left on device"), "writing x", node="n")
    assert str(err).startswith("node 'n': writing x: no space left on the device holding")
    assert err.exit_code == 4


@pytest.mark.parametrize(("error", "why", "hint"), [
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied in the store {root}",
     "pass --cache-dir DIR where you can write, or give this user write access to the store"),
    (PermissionError(errno.EPERM, "Operation not permitted"),
     "permission denied in the store {root}",
     "pass --cache-dir DIR where you can write, or give this user write access to the store"),
    (OSError(errno.EROFS, "Read-only file system"), "the store {root} is on a read-only file system",
     "pass --cache-dir DIR on a writable disk, or remount the store read-write"),
], ids=["EACCES", "EPERM", "EROFS"])
def test_a_store_make_cannot_write_is_one_line_naming_it_and_what_to_do(tmp_path, monkeypatch,
                                                                         error, why, hint):
    """A non-root user without write access (EACCES; tests run as root, whom chmod does not
    stop, so the error is raised here) reads as the read-only mount does (EROFS, made real in
    test_faults.py): the store, why, and what to do; nothing is left behind."""
    store = Store(tmp_path / "cache")
    store.root.mkdir()

    def refuse(path, flags, mode=0o777):
        raise error

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(StoreError) as info:
        store.require_writable("cannot build 2 nodes")
    monkeypatch.undo()
    assert str(info.value) == f"cannot build 2 nodes: {why.format(root=store.root)} ({hint})"
    assert info.value.exit_code == 4
    assert list(store.root.iterdir()) == []
    store.require_writable("cannot build 2 nodes")  # writable: no error, no probe left
    assert list(store.root.iterdir()) == []


def test_a_reader_that_cannot_write_the_use_lock_still_holds_it(tmp_path, monkeypatch):
    """A read-only verb in a store it cannot write takes the shared use lock on a read-only
    descriptor: a gc run by the store's owner still finds it in use."""
    store = Store(tmp_path / "cache")
    store.root.mkdir()
    (store.root / "use.lock").touch()
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with store.in_use():
        monkeypatch.undo()
        with pytest.raises(StoreError, match="another mergebuild"), Store(store.root).exclusive():
            pass
    with Store(store.root).exclusive():  # released with the command
        pass


def test_a_same_size_edit_with_its_mtime_put_back_is_still_seen(tmp_path, demo_models):
    """The stat signature holds st_ctime_ns: a source rewritten in place, same size, with its
    mtime restored (as `touch -d` or a careless copy tool does) is re-hashed, and the plan
    says it changed, instead of reusing the old digest."""
    source = tmp_path / "model"
    shutil.copytree(demo_models["base"], source)
    weights = source / "model.safetensors"
    cache = StatCache(tmp_path / "state.db")
    before = cache.digest(weights)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = weights.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        stat.st_ino, stat.st_size, stat.st_mtime_ns)
    assert StatCache(tmp_path / "state.db").digest(weights) == file_xxh128(weights) != before


def test_a_locked_stat_cache_is_waited_for_with_a_message_then_fails_in_one_line(
        tmp_path, demo_models):
    """Another process holding state.db locked: plan says it waits, then fails with one
    line (bounded by MERGEBUILD_STATE_DB_WAIT), instead of stalling silently for minutes."""
    from cli_process import run_cli

    (tmp_path / "Mergefile").write_text(
        f"version: 1\nmodels:\n  base: {{source: {demo_models['base']}}}\n"
        f"  inst: {{source: {demo_models['instruct']}}}\n  m:\n    merge_method: linear\n"
        "    models: [{model: base, parameters: {weight: 1}}, "
        "{model: inst, parameters: {weight: 1}}]\n")
    store = tmp_path / "cache"
    StatCache(store / "state.db").digest(tmp_path / "Mergefile")  # the database exists
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(store / 'state.db')!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); c.execute('DELETE FROM file_digests')\n"
            "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        started = time.monotonic()
        run = run_cli(["plan"], cwd=tmp_path, env={"MERGEBUILD_STATE_DB_WAIT": "1"})
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert run.returncode == 4, run.stderr
    waiting, error = run.error_lines
    assert waiting == (f"mergebuild: waiting up to 1 s for the stat cache {store / 'state.db'} "
                       "(another process holds it locked)")
    assert error == (f"mergebuild: error: the stat cache {store / 'state.db'} is locked by "
                     "another process (waited 1 s) (let that process finish, or delete "
                     "state.db: it is only a cache)")
    assert took < 30
    assert run_cli(["plan"], cwd=tmp_path).returncode == 0  # free again: plans as before
