"""Two Mergefiles sharing one store: records keyed by each Mergefile, gc keeps what is live.

Every run here is the real CLI in its own process (tests/cli_process.py), the store shared
through ``MERGEBUILD_CACHE`` as a user would share it.
"""

from __future__ import annotations

import json
import re
import textwrap
import threading
from pathlib import Path

from cli_process import Run, run_cli, start_cli
from conftest import CHAIN

from mergebuild.store.objects import Store, mergefile_id

MERGE_NODES = ("base-instruct", "chat-code", "final-model")


def _project(root: Path, models: Path, t: str) -> Path:
    """A Mergefile with the chain's node names; ``t`` changes chat-code (and final-model)."""
    root.mkdir(parents=True)
    text = textwrap.dedent(CHAIN).format(models=models).replace("t: 0.4", f"t: {t}")
    (root / "Mergefile").write_text(text)
    return root


def _plan(root: Path, env: dict[str, str]) -> dict[str, dict]:
    run = run_cli(["plan", "--json"], cwd=root, env=env)
    assert run.returncode == 0, run.stderr
    return {s["node"]: s for s in json.loads(run.stdout) if s["kind"] == "merge"}


def _built(runs: list[Run]) -> list[str]:
    """The node of every build the runs did (``built NODE in ...``), wherever it printed."""
    return [m.group(1) for r in runs for m in re.finditer(r"^built (\S+) in ", r.stdout + r.stderr,
                                                          re.MULTILINE)]


def _objects(store: Path) -> set[str]:
    return {p.name for p in (store / "objects").glob("*/*")}


def test_two_mergefiles_with_the_same_node_names_share_a_store_beside_a_gc_loop(
        tmp_path, demo_models):
    models = demo_models["base"].parent
    store = tmp_path / "store"
    env = {"MERGEBUILD_CACHE": str(store)}
    a = _project(tmp_path / "a", models, "0.4")
    b = _project(tmp_path / "b", models, "0.7")  # base-instruct is the same build in both

    stop = threading.Event()
    gcs: list[Run] = []

    def gc_loop() -> None:
        while not stop.is_set():
            for root in (a, b):
                gcs.append(run_cli(["gc"], cwd=root, env=env))

    collector = threading.Thread(target=gc_loop)
    collector.start()
    try:
        makes = [start_cli(["make"], cwd=root, env=env) for root in (a, b, a, b)]
        runs = [m.wait(300) for m in makes]
        # And once more each, one after the other, with the gc loop still running.
        runs += [run_cli(["make"], cwd=root, env=env) for root in (b, a)]
    finally:
        stop.set()
        collector.join(120)
    failed = [(r.returncode, r.stderr.strip().splitlines()[-3:]) for r in runs if r.returncode]
    assert not failed, failed  # the exit code and the last lines of each failed make
    for gc in gcs:  # each gc either ran or found a make using the store and removed nothing
        assert gc.returncode == 0 or "is using the store" in gc.stderr, gc.stderr
    assert any(gc.returncode == 0 for gc in gcs)

    # Five distinct builds (base-instruct once, the other two per Mergefile), each built once.
    built = _built(runs)
    assert sorted(built) == sorted(["base-instruct", "chat-code", "chat-code", "final-model",
                                    "final-model"]), built
    assert len(_objects(store)) == 5

    # Each Mergefile still sees its own current builds, with no false stale reasons, after
    # a gc from the other one.
    for gc_from, root in ((b, a), (a, b)):
        assert run_cli(["gc"], cwd=gc_from, env=env).returncode == 0
        states = _plan(root, env)
        assert {n: (s["status"], s["reasons"]) for n, s in states.items()} == {
            n: ("fresh", []) for n in MERGE_NODES}
    plan_a, plan_b = _plan(a, env), _plan(b, env)
    assert plan_a["base-instruct"]["key"] == plan_b["base-instruct"]["key"]
    assert plan_a["final-model"]["key"] != plan_b["final-model"]["key"]

    # Records live apart: each Mergefile's under its own id, naming it.
    for root in (a, b):
        owner = json.loads((store / "refs" / mergefile_id(root / "Mergefile")
                            / "_mergefile.json").read_text())
        assert owner == {"mergefile": str((root / "Mergefile").resolve())}

    # A Mergefile that no longer exists is not live: gc from a removes b's own builds, keeps
    # the one they share and everything pinned.
    assert run_cli(["pin", "chat-code", "--as", "b-release"], cwd=b, env=env).returncode == 0
    (b / "Mergefile").unlink()
    gc = run_cli(["gc"], cwd=a, env=env)
    assert gc.returncode == 0, gc.stderr
    assert _objects(store) == {plan_a[n]["key"] for n in MERGE_NODES} | {
        plan_b["chat-code"]["key"]}
    assert str(plan_b["final-model"]["path"]) in gc.stdout


def test_old_flat_refs_stay_readable_and_move_on_the_next_write(tmp_path, demo_models):
    """A store written before refs were keyed by Mergefile: plans read its records (no false
    'new node'), gc keeps them, and make moves each into the Mergefile's own directory."""
    models = demo_models["base"].parent
    root = _project(tmp_path / "a", models, "0.4")
    env = {"MERGEBUILD_CACHE": str(tmp_path / "store")}
    assert run_cli(["make"], cwd=root, env=env).returncode == 0
    refs = tmp_path / "store" / "refs"
    ours = refs / mergefile_id(root / "Mergefile")
    for node in MERGE_NODES:  # back to the old layout
        (ours / f"{node}.json").rename(refs / f"{node}.json")
    (ours / "_mergefile.json").unlink()
    ours.rmdir()
    old_keys = {n: json.loads((refs / f"{n}.json").read_text())["key"] for n in MERGE_NODES}

    (root / "Mergefile").write_text((root / "Mergefile").read_text().replace("t: 0.4", "t: 0.6"))
    states = _plan(root, env)
    assert states["chat-code"]["reasons"] == ["parameter changed: t 0.4 → 0.6"]
    assert states["base-instruct"]["status"] == "fresh"
    gc = run_cli(["gc"], cwd=root, env=env)
    assert gc.returncode == 0 and "removed object" not in gc.stdout, gc.stdout
    assert set(old_keys.values()) <= _objects(tmp_path / "store")

    assert run_cli(["make"], cwd=root, env=env).returncode == 0
    assert not any(refs.glob("*.json"))
    moved = Store(tmp_path / "store").refs_of(root / "Mergefile")
    assert moved.read("base-instruct")["key"] == old_keys["base-instruct"]
    assert moved.read("chat-code")["key"] != old_keys["chat-code"]
