"""`mergebuild gc`: never removes what the Mergefile reaches; removes orphans and leftovers."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from click.testing import CliRunner
from conftest import CHAIN

from mergebuild.cli import main
from mergebuild.provenance.integrity import verify_directory

MERGE_NODES = ("base-instruct", "chat-code", "final-model")


def run(ws, *args):
    return CliRunner().invoke(main, ["-f", str(ws.mergefile), "--cache-dir", str(ws.cache),
                                     *args], obj={})


def objects(ws) -> set[str]:
    return {p.name for p in (ws.cache / "objects").glob("*/*")}


def current_paths(ws) -> dict[str, Path]:
    project = ws.project()
    return {n: project.path(n) for n in MERGE_NODES}


def orphan_object(ws, like: Path) -> Path:
    """A published-looking object under a key no node has."""
    path = ws.cache / "objects" / "ee" / ("ee" * 16)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(like, path)
    return path


def dead_tmp_dir(ws) -> Path:
    """What a build killed with SIGKILL leaves: a temp dir whose lock nobody holds."""
    path = ws.cache / "tmp" / f"{'dd' * 16}.4242.abcd0123"
    path.mkdir(parents=True)
    (path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 5000)
    return path


def old_lock(ws, key: str = "cc" * 16) -> Path:
    path = ws.cache / "locks" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("4242\n")
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    return path


def test_gc_removes_an_orphan_object_and_a_dead_temp_dir_and_nothing_reachable(workspace):
    workspace.chain()
    workspace.project().make(["final-model"])
    before = current_paths(workspace)
    orphan = orphan_object(workspace, before["chat-code"])
    tmp = dead_tmp_dir(workspace)
    lock = old_lock(workspace)

    result = run(workspace, "gc")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"removed object {orphan} (")
    assert lines[1].startswith(f"removed temp {tmp} (4.9 KiB, left by an interrupted build")
    assert lines[2].startswith(f"removed lock {lock} (")
    assert lines[3].startswith("freed ") and lines[3].endswith(
        "in 3 items; kept 3 reachable builds")
    assert not orphan.exists() and not tmp.exists() and not lock.exists()
    assert not (workspace.cache / "objects" / "ee").exists()  # empty prefix dir too
    assert current_paths(workspace) == before
    assert all(verify_directory(p) == [] for p in before.values())
    assert run(workspace, "plan", "final-model").output.endswith(
        "nothing to do: every node is up to date\n")


def test_dry_run_lists_and_removes_nothing(workspace):
    workspace.chain()
    workspace.project().make(["final-model"])
    orphan = orphan_object(workspace, current_paths(workspace)["final-model"])
    tmp = dead_tmp_dir(workspace)
    size = sum(f.stat().st_size for f in orphan.iterdir()) + 5000
    report = workspace.project().collect_garbage(dry_run=True)
    assert [(g.kind, g.path) for g in report.removed] == [("object", orphan), ("temp", tmp)]
    assert report.bytes_freed == size
    result = run(workspace, "gc", "--dry-run")
    assert result.output.splitlines()[-1].startswith("would free ")
    assert orphan.exists() and tmp.exists()


def test_gc_keeps_the_last_build_of_an_edited_node_until_it_is_rebuilt(workspace):
    workspace.chain()
    workspace.project().make(["final-model"])
    old = current_paths(workspace)
    workspace.write(CHAIN.replace("{{t: 0.4}}", "{{t: 0.5}}"))
    report = workspace.project().collect_garbage()
    assert report.removed == () and report.kept == 3
    assert objects(workspace) == {p.name for p in old.values()}

    workspace.project().make(["final-model"])
    new = current_paths(workspace)
    report = workspace.project().collect_garbage()
    removed = {g.path.name for g in report.removed if g.kind == "object"}
    assert removed == {old["chat-code"].name, old["final-model"].name}
    # Their publish records go with them; the kept objects keep theirs.
    assert {g.path.stem for g in report.removed if g.kind == "record"} == removed
    assert objects(workspace) == {p.name for p in new.values()}
    assert {p.stem for p in (workspace.cache / "published").iterdir()} == objects(workspace)
    assert new["base-instruct"] == old["base-instruct"]


def test_gc_keeps_builds_of_another_mergefile_sharing_the_store(workspace):
    workspace.chain()
    workspace.project().make(["final-model"])
    kept = current_paths(workspace)
    other = workspace.root / "other" / "Mergefile"
    other.parent.mkdir()
    other.write_text(f"version: 1\nmodels:\n  a: {{source: {workspace.models}/base}}\n")
    result = CliRunner().invoke(main, ["-f", str(other), "--cache-dir", str(workspace.cache),
                                       "gc"], obj={})
    assert result.exit_code == 0, result.output
    assert objects(workspace) == {p.name for p in kept.values()}


def test_gc_keeps_a_temp_dir_whose_build_is_running(workspace):
    workspace.chain()
    project = workspace.project()
    key = "ab" * 16
    with project.store.lock(key):
        running = project.store.new_tmp(key)
        assert project.collect_garbage().removed == ()
    assert running.exists()
    assert [g.path for g in project.collect_garbage().removed] == [running]


def test_gc_removes_nothing_when_a_source_is_missing(workspace, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(workspace.models, models)
    workspace.write(CHAIN.replace("{models}", str(models)))
    workspace.project().make(["final-model"])
    before = objects(workspace)
    dead_tmp_dir(workspace)
    shutil.rmtree(models / "math")
    result = run(workspace, "gc")
    assert result.exit_code == 4
    assert result.output.startswith("mergebuild: error: gc cannot work out what is reachable: ")
    assert "nothing was removed" in result.output
    assert objects(workspace) == before and any((workspace.cache / "tmp").iterdir())


def test_gc_removes_demo_models_of_an_older_generator(workspace):
    workspace.write("""\
        version: 1
        models:
          instruct: {{source: demo://instruct}}
          code: {{source: demo://code}}
          mix:
            merge_method: linear
            models: [{{model: instruct, parameters: {{weight: 0.5}}}},
                     {{model: code, parameters: {{weight: 0.5}}}}]
        """)
    workspace.project().make(["mix"])
    current = sorted((workspace.cache / "demo").iterdir())
    stale = workspace.cache / "demo" / "0123456789abcdef"
    shutil.copytree(current[0], stale)
    report = workspace.project().collect_garbage()
    assert [(g.kind, g.path) for g in report.removed] == [("demo", stale)]
    assert sorted((workspace.cache / "demo").iterdir()) == current
    assert verify_directory(workspace.project().path("mix")) == []


def test_gc_refuses_while_another_command_uses_the_store(workspace):
    """A make (of any Mergefile) holding the store's use lock: gc removes nothing, says why."""
    workspace.chain()
    workspace.project().make(["final-model"])
    orphan = orphan_object(workspace, current_paths(workspace)["chat-code"])
    with workspace.project().store.in_use():  # what a running make/verify/export holds
        result = run(workspace, "gc")
        dry = run(workspace, "gc", "-n")  # listing only: allowed alongside
    assert result.exit_code == 4, result.output
    assert result.output.count("\n") == 1
    assert "another mergebuild (make, verify, export or push) is using the store" in result.output
    assert "nothing was removed" in result.output and "run gc again" in result.output
    assert orphan.exists()
    assert dry.exit_code == 0 and f"would remove object {orphan}" in dry.output
    after = run(workspace, "gc")
    assert after.exit_code == 0, after.output
    assert not orphan.exists()


def test_make_waits_for_a_running_gc_then_builds(workspace):
    import threading

    from mergebuild.build.events import Reporter

    class Recorder(Reporter):
        busy = 0

        def store_busy(self) -> None:
            self.busy += 1

    workspace.chain()
    workspace.project().make(["base-instruct"])  # the store exists (gc of none locks nothing)
    reporter, results = Recorder(), []
    with workspace.project().store.exclusive():
        worker = threading.Thread(target=lambda: results.append(
            workspace.project().make(["chat-code"], reporter=reporter)))
        worker.start()
        deadline = time.monotonic() + 30
        while not reporter.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.join(0.5)
        assert worker.is_alive() and reporter.busy == 1
        assert not (workspace.cache / "refs" / "chat-code.json").exists()
    worker.join(60)
    assert results and results[0].ok
    assert [(r.name, r.outcome) for r in results[0].results] == [("chat-code", "built")]


def test_gc_interrupted_while_removing_leaves_no_half_object(workspace, monkeypatch):
    """An object leaves objects/ in one rename before it is deleted: a gc killed mid-delete
    leaves a dead temp dir (the next gc removes it), never a half object a make would trust."""
    import mergebuild.store.objects as store_module

    workspace.chain()
    workspace.project().make(["final-model"])
    orphan = orphan_object(workspace, current_paths(workspace)["chat-code"])
    real = store_module.remove_tree

    def killed(root):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "remove_tree", killed)
    interrupted = run(workspace, "gc")
    assert interrupted.exit_code == 130, interrupted.output
    assert not orphan.exists()
    leftovers = list((workspace.cache / "tmp").iterdir())
    assert [p.name.split(".")[:2] for p in leftovers] == [[orphan.name, "gc"]]
    monkeypatch.setattr(store_module, "remove_tree", real)
    again = run(workspace, "gc")
    assert again.exit_code == 0, again.output
    assert f"removed temp {leftovers[0]}" in again.output and not leftovers[0].exists()


def test_verify_of_a_node_holds_the_store_so_gc_waits_for_it(workspace):
    """``Project.verify`` (what ``mergebuild verify NODE`` calls) holds the store's use lock:
    while a gc holds the store, it waits; a built directory needs no store at all."""
    import threading

    from mergebuild.api import Project

    workspace.chain()
    workspace.project().make(["base-instruct"])
    directory = workspace.project().path("base-instruct")
    reports = []
    with workspace.project().store.exclusive():
        worker = threading.Thread(target=lambda: reports.append(
            workspace.project().verify("base-instruct")))
        worker.start()
        worker.join(1.0)
        assert worker.is_alive() and reports == []
        assert Project.verify_directory(directory).ok
    worker.join(60)
    assert [(r.directory, r.ok) for r in reports] == [(directory, True)]
    assert run(workspace, "verify", "base-instruct").output.startswith("verified ")
