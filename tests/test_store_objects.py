"""The store: atomic read-only publish, per-key locks, dead temp dirs, error mapping."""

from __future__ import annotations

import errno
import os
import threading
import time

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
