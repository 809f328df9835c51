"""Faults with real processes: kills at named points, four makes at once, a full disk, parents
and store objects changed underneath us, and secrets that must not leak.

Every `make` here is its own OS process running the real CLI (see cli_process.py); faults
are injected with MERGEBUILD_FAULT=<point>:<n>[:<action>] (mergebuild/faults.py). The
KILLS table feeds RELIABILITY.md (tests/gen_reliability.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from cli_process import run_cli, start_cli
from conftest import CHAIN

from mergebuild.faults import POINTS
from mergebuild.provenance.integrity import verify_directory
from mergebuild.store.objects import Store

NODES = ("base-instruct", "chat-code", "final-model")

# (point, n-th hit, action). Build order is chat-code, base-instruct, final-model, 39 tensors
# each, so a high n lands in a later node.
KILLS = [
    ("sources.digest", 3, "kill"),
    ("store.lock_acquired", 1, "kill"),
    ("engine.start", 1, "kill"), ("engine.start", 3, "term"),
    ("engine.open_parent", 2, "kill"),
    ("engine.read_tensor", 1, "kill"), ("engine.read_tensor", 40, "int"),
    ("engine.read_tensor", 200, "kill"), ("engine.read_tensor", 10, "term"),
    ("engine.computed", 20, "kill"),
    ("writer.mid_tensor", 5, "kill"), ("writer.mid_tensor", 45, "int"),
    ("writer.mid_tensor", 100, "kill"),
    ("writer.before_fsync", 1, "kill"), ("writer.before_fsync", 3, "int"),
    ("engine.after_finish", 1, "kill"), ("engine.after_finish", 2, "int"),
    ("engine.support_file", 2, "kill"),
    ("provenance.card_written", 1, "kill"), ("provenance.card_written", 3, "int"),
    ("provenance.written", 1, "kill"),
    ("store.before_fsync", 1, "kill"),
    ("store.before_rename", 1, "kill"), ("store.before_rename", 2, "int"),
    ("store.after_rename", 1, "kill"), ("store.after_rename", 3, "int"),
    ("project.before_ref", 1, "kill"), ("project.before_ref", 2, "int"),
    ("store.ref_tmp_written", 1, "kill"),
    ("project.node_done", 2, "kill"),
]
EXPECTED_EXIT = {"kill": -9, "int": 130, "term": 130}


def _files_digest(directory: Path) -> dict[str, str]:
    """sha256 of every output file except the two that carry timestamps."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.is_file() and p.name not in ("provenance.json", "README.md")}


def _outputs(store: Path) -> dict[str, tuple[str, dict[str, str]]]:
    out = {}
    for node in NODES:
        ref = json.loads((store / "refs" / f"{node}.json").read_text())
        obj = Store(store).object_dir(ref["key"])
        out[node] = (ref["digest"], _files_digest(obj))
    return out


def _assert_store_sound(store: Path) -> None:
    """Every published object verifies in full; leftovers are only dead temp dirs."""
    s = Store(store)
    for obj in s.iter_objects():
        assert verify_directory(obj) == [], obj
    if s.tmp.exists():
        assert sorted(s.tmp.iterdir()) == s.dead_tmp_dirs()


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory, demo_models) -> Path:
    root = tmp_path_factory.mktemp("chain")
    (root / "Mergefile").write_text(CHAIN.format(models=demo_models["base"].parent))
    return root


@pytest.fixture(scope="module")
def reference(chain_dir) -> dict:
    run = run_cli(["--cache-dir", "ref-store", "make", "final-model"], cwd=chain_dir)
    assert run.returncode == 0, run.stderr
    return _outputs(chain_dir / "ref-store")


def test_every_fault_point_is_exercised():
    assert {p for p, _, _ in KILLS} == set(POINTS)
    assert len(KILLS) >= 20


@pytest.mark.parametrize(("point", "n", "action"), KILLS,
                         ids=[f"{p}:{n}:{a}" for p, n, a in KILLS])
def test_killed_make_leaves_a_sound_store_and_resumes_bit_identically(
        point, n, action, chain_dir, reference):
    store = chain_dir / f"store-{point}-{n}-{action}"
    argv = ["--cache-dir", store.name, "make", "final-model"]
    killed = run_cli(argv, cwd=chain_dir, env={"MERGEBUILD_FAULT": f"{point}:{n}:{action}"})
    assert killed.returncode == EXPECTED_EXIT[action], (killed.returncode, killed.stderr)
    if action != "kill":
        lines = killed.error_lines
        assert len(lines) == 1 and lines[0].startswith("mergebuild: "), killed.stderr
        assert "interrupted" in lines[0]
        # Ctrl-C cleans up after itself: no temp dir survives.
        assert not (store / "tmp").exists() or not any((store / "tmp").iterdir())
    _assert_store_sound(store)

    resumed = run_cli(argv, cwd=chain_dir)
    assert resumed.returncode == 0, resumed.stderr
    _assert_store_sound(store)
    assert _outputs(store) == reference
    shutil.rmtree(store, ignore_errors=True)


@pytest.mark.parametrize("contended", [False, True], ids=["plain", "lock-held-0.5s"])
def test_four_concurrent_makes_build_each_node_once(chain_dir, reference, contended):
    store = chain_dir / f"store-concurrent-{contended}"
    argv = ["--cache-dir", store.name, "make", "final-model"]
    # lock_acquired:1 with a sleep makes the first holder of each process's first lock slow,
    # so the others must wait on it.
    env = {"MERGEBUILD_FAULT": "store.lock_acquired:1:sleep=0.5"} if contended else None
    started = [start_cli(argv, cwd=chain_dir, env=env) for _ in range(4)]
    runs = [s.wait() for s in started]
    assert [r.returncode for r in runs] == [0, 0, 0, 0], [r.stderr for r in runs]
    built = [line.split()[1] for r in runs for line in r.stdout.splitlines()
             if line.startswith("built ")]
    assert sorted(built) == sorted(NODES)
    finals = {line for r in runs for line in r.stdout.splitlines()
              if line.startswith("final-model: ")}
    assert len(finals) == 1
    _assert_store_sound(store)
    assert _outputs(store) == reference
    assert not any((store / "tmp").iterdir())


def test_full_disk_fails_cleanly_naming_the_node_and_the_store_stays_usable(chain_dir,
                                                                             reference):
    store = chain_dir / "store-full"
    argv = ["--cache-dir", store.name, "make", "final-model"]
    # Any file this process writes may grow to 100 KB (a model is ~360 KB): EFBIG, as a
    # full disk gives ENOSPC.
    full = run_cli(argv, cwd=chain_dir, fsize_limit=100_000)
    assert full.returncode == 4, full.stderr
    lines = full.error_lines
    assert len(lines) == 1, full.stderr
    assert lines[0].startswith("mergebuild: error: node 'chat-code': ")
    assert "no space left" in lines[0] and "--cache-dir" in lines[0]
    assert list(Store(store).iter_objects()) == []
    assert not any((store / "tmp").iterdir())
    assert run_cli(argv, cwd=chain_dir).returncode == 0
    assert _outputs(store) == reference


# --- parents and objects changed underneath -------------------------------------------------

TWO_PARENTS = """\
version: 1
models:
  a: {{source: {a}}}
  b: {{source: {b}}}
  mix:
    merge_method: linear
    models:
      - {{model: a, parameters: {{weight: 0.5}}}}
      - {{model: b, parameters: {{weight: 0.5}}}}
"""


@pytest.fixture
def private_parents(tmp_path, demo_models) -> Path:
    for name, src in (("a", "base"), ("b", "instruct")):
        shutil.copytree(demo_models[src], tmp_path / name)
    (tmp_path / "Mergefile").write_text(TWO_PARENTS.format(a=tmp_path / "a", b=tmp_path / "b"))
    return tmp_path


@pytest.mark.parametrize(("point", "action"), [
    ("engine.read_tensor:5", "flip"),      # same size, new mtime, while being read
    ("engine.read_tensor:7", "append"),    # grows while being read
    ("engine.start:1", "flip"),            # after planning, before the engine opened it
], ids=["flip-mid-read", "append-mid-read", "flip-before-open"])
def test_parent_modified_during_build_is_detected_and_not_published(private_parents, point,
                                                                    action):
    weights = private_parents / "b" / "model.safetensors"
    run = run_cli(["--cache-dir", "store", "make", "mix"], cwd=private_parents,
                  env={"MERGEBUILD_FAULT": f"{point}:{action}={weights}"})
    assert run.returncode == 3, run.stderr
    lines = run.error_lines
    assert len(lines) == 1 and lines[0].startswith("mergebuild: error: node 'mix': "), lines
    assert "'b' changed on disk" in lines[0]
    assert list(Store(private_parents / "store").iter_objects()) == []
    assert not any((private_parents / "store" / "tmp").iterdir())


def test_store_object_edited_after_publish(chain_dir, reference):
    store = chain_dir / "store-edited"
    argv = ["--cache-dir", store.name, "make", "final-model"]
    assert run_cli(argv, cwd=chain_dir).returncode == 0
    obj = Store(store).object_dir(json.loads((store / "refs/final-model.json").read_text())["key"])
    weights = obj / "model.safetensors"

    # Same size, one byte flipped: the cheap check (sizes) cannot see it; verify can,
    # and make --force rebuilds it.
    os.chmod(obj, 0o755)
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert [p.kind for p in verify_directory(obj)] == ["modified"]
    assert "built final-model" not in run_cli(argv, cwd=chain_dir).stdout
    rebuilt = run_cli([*argv[:-1], "--force", "final-model"], cwd=chain_dir)
    assert rebuilt.returncode == 0 and "built final-model" in rebuilt.stdout
    assert verify_directory(obj) == []

    # Size changed: make's cheap check notices, and make rebuilds.
    os.chmod(obj, 0o755)
    os.chmod(weights, 0o644)
    with open(weights, "ab") as f:
        f.write(b"\0")
    plan = run_cli(["--cache-dir", store.name, "plan", "final-model"], cwd=chain_dir)
    assert "output corrupt or incomplete" in plan.stdout
    again = run_cli(argv, cwd=chain_dir)
    assert again.returncode == 0 and "built final-model" in again.stdout
    _assert_store_sound(store)
    assert _outputs(store) == reference


# --- security ----------------------------------------------------------------------------------

HF_TOKEN = "hf_" + "Q" * 34
OTHER_SECRET = "s3cr3t-value-" + "z" * 20


def test_no_secrets_in_provenance_cards_refs_or_logs(chain_dir):
    root = chain_dir / "secrets"
    root.mkdir()
    (root / "Mergefile").write_text(
        (chain_dir / "Mergefile").read_text().replace(
            "    parameters: {t: 0.4}\n",
            f"    parameters: {{t: 0.4}}\n    description: pulled with {HF_TOKEN}\n"))
    run = run_cli(["--cache-dir", "store", "make", "final-model"], cwd=root,
                  env={"HF_TOKEN": HF_TOKEN, "MY_API_SECRET": OTHER_SECRET})
    assert run.returncode == 0, run.stderr
    haystacks = [run.stdout, run.stderr]
    for path in (root / "store").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt", ".lock"):
            haystacks.append(path.read_text(errors="replace"))
    for text in haystacks:
        assert HF_TOKEN not in text
        assert OTHER_SECRET not in text


def test_symlinks_out_of_a_source_are_not_copied(tmp_path, demo_models):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tokenizer.json").write_text('{"stolen": "OUTSIDE-SECRET"}')
    (outside / "special_tokens_map.json").write_text('{"stolen": "OUTSIDE-SECRET"}')
    for name, src in (("a", "base"), ("b", "instruct")):
        shutil.copytree(demo_models[src], tmp_path / name)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / "a" / name).unlink()
        (tmp_path / "a" / name).symlink_to(outside / name)
    (tmp_path / "Mergefile").write_text(TWO_PARENTS.format(a=tmp_path / "a", b=tmp_path / "b"))
    run = run_cli(["--cache-dir", "store", "make", "mix"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    (obj,) = Store(tmp_path / "store").iter_objects()
    assert not (obj / "tokenizer.json").exists()
    assert not (obj / "special_tokens_map.json").exists()
    assert (obj / "tokenizer_config.json").is_file()  # in-directory files still are
    for path in obj.iterdir():
        assert "OUTSIDE-SECRET" not in path.read_text(errors="replace")
