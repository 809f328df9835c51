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
from cli_process import run_cli, run_python_m, run_read_only, start_cli
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
        ref = json.loads(next((store / "refs").glob(f"*/{node}.json")).read_text())
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
    built = [line.split()[1] for r in runs for line in r.stderr.splitlines()
             if line.startswith("built ")]  # progress is on stderr, results on stdout
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



def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: what a writer would change."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


# Digests a source file through the store's stat cache with reading files forbidden: the
# cache of a read-only store must still answer.
_DIGEST_FROM_CACHE = """
import sys
from pathlib import Path
import mergebuild.io.hashing as hashing
def no_reading(path):
    raise AssertionError(f"re-hashed {path}")
hashing.file_xxh128 = no_reading
print(hashing.StatCache(Path(sys.argv[1])).digest(Path(sys.argv[2])))
"""


def test_read_only_store_make_fails_in_one_line_and_reading_verbs_work(chain_dir, demo_models):
    """A store on a read-only file system (a read-only bind mount in a private mount
    namespace: a real EROFS, which root gets too). `make` with something to build fails at
    once in one line naming the store and what to do; plan, path, verify, lineage, metrics
    and a make with nothing to build work, without the write lock, the stat cache's write
    access or a refs migration, and change nothing in the store."""
    store = chain_dir / "store-read-only"
    assert run_cli(["--cache-dir", store.name, "make", "base-instruct"],
                   cwd=chain_dir).returncode == 0
    # A plain process that never imports torch closes the stat cache: no -wal/-shm is left,
    # so the read-only cache must be opened without them.
    assert run_python_m(["--cache-dir", store.name, "plan"], cwd=chain_dir).returncode == 0
    assert not list(store.glob("state.db-*"))
    before = _tree(store)
    ref = json.loads(next((store / "refs").glob("*/base-instruct.json")).read_text())
    built = Store(store).object_dir(ref["key"])

    make = run_read_only(store, ["--cache-dir", store.name, "make", "final-model"],
                         cwd=chain_dir)
    assert make.returncode == 4, make.stderr
    assert make.error_lines == [(
        f"mergebuild: error: cannot build 2 nodes: the store {store} is on a read-only file "
        "system (pass --cache-dir DIR on a writable disk, or remount the store read-write)")]
    assert "Traceback" not in make.stderr

    plan = run_read_only(store, ["--cache-dir", store.name, "plan"], cwd=chain_dir)
    assert plan.returncode == 0, plan.stderr
    status = {line.split()[0]: line.split()[2] for line in plan.stdout.splitlines()[:-1]}
    assert status["base-instruct"] == "fresh" and status["final-model"] == "stale"
    assert plan.stdout.splitlines()[-1] == "2 to build"
    path = run_read_only(store, ["--cache-dir", store.name, "path", "base-instruct"],
                         cwd=chain_dir)
    assert (path.returncode, path.stdout) == (0, f"{built}\n"), path.stderr
    verify = run_read_only(store, ["--cache-dir", store.name, "verify", "base-instruct"],
                           cwd=chain_dir)
    assert verify.returncode == 0 and verify.stdout.startswith("verified "), verify.stderr
    lineage = run_read_only(store, ["--cache-dir", store.name, "lineage", "base-instruct"],
                            cwd=chain_dir)
    assert lineage.returncode == 0 and lineage.stdout.startswith("base-instruct "), (
        lineage.stderr)
    metrics = run_read_only(store, ["--cache-dir", store.name, "metrics"], cwd=chain_dir)
    assert metrics.returncode == 0 and "no scores yet" in metrics.stdout, metrics.stderr
    again = run_read_only(store, ["--cache-dir", store.name, "make", "base-instruct"],
                          cwd=chain_dir)
    assert (again.returncode, again.stdout) == (0, f"base-instruct: {built}\n"), again.stderr

    weights = demo_models["base"] / "model.safetensors"
    cached = run_read_only(store, [str(store / "state.db"), str(weights)], cwd=chain_dir,
                           python=_DIGEST_FROM_CACHE)
    assert cached.returncode == 0, cached.stderr
    assert cached.stdout.strip().startswith("xxh128:")
    assert _tree(store) == before


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
    ref = next((store / "refs").glob("*/final-model.json"))
    obj = Store(store).object_dir(json.loads(ref.read_text())["key"])
    weights = obj / "model.safetensors"

    # Same size, one byte flipped: the file's stat signature changed, so make re-hashes it
    # against the store's publish record, finds it corrupt and rebuilds it.
    os.chmod(obj, 0o755)
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert [p.kind for p in verify_directory(obj)] == ["modified"]
    rebuilt = run_cli(argv, cwd=chain_dir)
    assert rebuilt.returncode == 0 and "built final-model" in rebuilt.stderr
    assert "output corrupt or incomplete in the store" in rebuilt.stdout + rebuilt.stderr
    assert verify_directory(obj) == []

    # Size changed: make's cheap check notices, and make rebuilds.
    os.chmod(obj, 0o755)
    os.chmod(weights, 0o644)
    with open(weights, "ab") as f:
        f.write(b"\0")
    plan = run_cli(["--cache-dir", store.name, "plan", "final-model"], cwd=chain_dir)
    assert "output corrupt or incomplete" in plan.stdout
    again = run_cli(argv, cwd=chain_dir)
    assert again.returncode == 0 and "built final-model" in again.stderr
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


# --- integrity: corrupt and forged objects, rebuilds under readers, export guard, signing ---


def _ref_object(store: Path, node: str) -> Path:
    ref = next((store / "refs").glob(f"*/{node}.json"))  # the one Mergefile's record
    return Store(store).object_dir(json.loads(ref.read_text())["key"])


def test_child_build_hashes_a_corrupt_parent_and_moves_it_aside(chain_dir, reference):
    # Same-size damage after planning (bit rot, or tampering the plan could not see): the
    # child's build hashes the parent as it streams and stops before publishing anything.
    store = chain_dir / "store-corrupt-parent"
    assert run_cli(["--cache-dir", store.name, "make", "base-instruct", "chat-code"],
                   cwd=chain_dir).returncode == 0
    parent = _ref_object(store, "base-instruct")
    weights = parent / "model.safetensors"
    os.chmod(weights, 0o644)  # read-only objects; the fault writes in place
    run = run_cli(["--cache-dir", store.name, "make", "final-model"], cwd=chain_dir,
                  env={"MERGEBUILD_FAULT": f"engine.start:1:flip={weights}"})
    assert run.returncode == 4, run.stderr
    assert run.error_lines == [(
        "mergebuild: error: node 'final-model': parent 'base-instruct' is corrupt in the "
        "store: model.safetensors is not what was published (it was moved aside; run make "
        "again to rebuild it)")]
    assert not parent.exists()
    (moved,) = Store(store).quarantined_objects()
    assert moved.name.startswith(parent.name)
    assert [d.name for d in Store(store).iter_objects()] == [_ref_object(store, "chat-code").name]
    again = run_cli(["--cache-dir", store.name, "make", "final-model"], cwd=chain_dir)
    assert again.returncode == 0, again.stderr
    assert "built base-instruct" in again.stderr and "built final-model" in again.stderr
    _assert_store_sound(store)
    assert _outputs(store) == reference


def _forge(obj: Path, other: Path) -> None:
    """Replace ``obj``'s weights and provenance with another build's, consistently: the
    object then verifies against its own provenance.json."""
    os.chmod(obj, 0o755)
    for path in obj.iterdir():
        os.chmod(path, 0o644)
        path.unlink()
    for path in other.iterdir():
        shutil.copyfile(path, obj / path.name)
    statement = json.loads((obj / "provenance.json").read_text())
    statement["predicate"]["buildDefinition"]["internalParameters"]["key"] = obj.name
    (obj / "provenance.json").write_text(json.dumps(statement))


def test_a_forged_object_is_caught_by_verify_export_push_and_make(chain_dir, reference):
    store = chain_dir / "store-forged"
    argv = ["--cache-dir", store.name]
    assert run_cli([*argv, "make", "final-model"], cwd=chain_dir).returncode == 0
    obj = _ref_object(store, "chat-code")
    _forge(obj, _ref_object(store, "base-instruct"))
    assert verify_directory(obj) == []  # provenance vouches for itself...

    verify = run_cli([*argv, "verify", "chat-code"], cwd=chain_dir)
    assert verify.returncode == 1
    assert "provenance.json: not-as-published: states sha256:" in verify.stdout
    export = run_cli([*argv, "export", "chat-code", "out"], cwd=chain_dir)
    assert export.returncode == 4 and not (chain_dir / "out").exists()
    assert "refusing to export: the build is not what the store published" in export.stderr
    push = run_cli([*argv, "push", "chat-code", "me/merged"], cwd=chain_dir,
                   env={"HF_HUB_OFFLINE": "1"})
    assert push.returncode == 4
    assert "refusing to push: the build is not what the store published" in push.stderr

    # ...but the store's record does not: make rebuilds it and the child is unchanged.
    plan = run_cli([*argv, "plan", "chat-code"], cwd=chain_dir)
    assert "output corrupt or incomplete" in plan.stdout
    again = run_cli([*argv, "make", "final-model"], cwd=chain_dir)
    assert again.returncode == 0, again.stderr
    assert "built chat-code" in again.stderr and "built final-model" not in again.stderr
    _assert_store_sound(store)
    assert _outputs(store) == reference


def test_forced_rebuild_of_a_parent_while_a_child_reads_it(chain_dir, reference):
    # `make -B base-instruct` publishes identical bytes while `make final-model` has the
    # parent open: content identity (the digest) decides, not the inode, so the reader
    # never fails (it failed 4 times in 25 when the object was replaced underneath it).
    store = chain_dir / "store-rebuild-under-reader"
    argv = ["--cache-dir", store.name]
    assert run_cli([*argv, "make", "base-instruct", "chat-code"], cwd=chain_dir).returncode == 0
    parent = _ref_object(store, "base-instruct")
    inode = (parent / "model.safetensors").stat().st_ino
    reader = start_cli([*argv, "make", "final-model"], cwd=chain_dir,
                       env={"MERGEBUILD_FAULT": "engine.read_tensor:1:sleep=4"})
    forced = run_cli([*argv, "make", "-B", "base-instruct"], cwd=chain_dir)
    assert forced.returncode == 0 and "built base-instruct" in forced.stderr, forced.stderr
    read = reader.wait()
    assert read.returncode == 0, read.stderr
    assert "built final-model" in read.stderr
    assert (parent / "model.safetensors").stat().st_ino == inode  # left in place
    _assert_store_sound(store)
    assert _outputs(store) == reference


def test_export_force_replaces_only_an_earlier_export_or_an_empty_directory(chain_dir):
    store = chain_dir / "store-export-guard"
    argv = ["--cache-dir", store.name]
    assert run_cli([*argv, "make", "chat-code"], cwd=chain_dir).returncode == 0
    obj = _ref_object(store, "chat-code")
    before = sorted(p.name for p in obj.iterdir())
    onto = run_cli([*argv, "export", "chat-code", str(obj), "--force"], cwd=chain_dir)
    assert onto.returncode == 1 and "inside the store" in onto.stderr
    assert sorted(p.name for p in obj.iterdir()) == before and verify_directory(obj) == []

    empty = chain_dir / "export-empty"
    empty.mkdir()
    assert run_cli([*argv, "export", "chat-code", str(empty), "--force"],
                   cwd=chain_dir).returncode == 0
    again = run_cli([*argv, "export", "chat-code", str(empty), "--force"], cwd=chain_dir)
    assert again.returncode == 0, again.stderr
    marker = json.loads((empty / ".mergebuild-export").read_text())
    assert marker["node"] == "chat-code" and marker["digest"].startswith("sha256:")
    assert verify_directory(empty) == []


def test_signed_export_verifies_with_only_the_public_key(chain_dir, tmp_path):
    store = chain_dir / "store-signing"
    argv = ["--cache-dir", str(store)]
    assert run_cli([*argv, "make", "final-model"], cwd=chain_dir).returncode == 0
    keygen = run_cli(["keygen", "release"], cwd=tmp_path)
    assert keygen.returncode == 0, keygen.stderr
    assert oct((tmp_path / "release.key").stat().st_mode & 0o777) == "0o600"
    out = tmp_path / "out"
    signed = run_cli([*argv, "-f", str(chain_dir / "Mergefile"), "export", "final-model",
                      str(out), "--sign", "release.key"], cwd=tmp_path)
    assert signed.returncode == 0, signed.stderr
    assert (out / "provenance.dsse.json").is_file()

    # Someone holding only the directory and the public key, no Mergefile, no store:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(tmp_path / "release.pub", elsewhere / "release.pub")
    ok = run_cli(["verify", str(out), "--key", "release.pub"], cwd=elsewhere)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ", signed by key " in ok.stdout

    # The key from the environment signs the same way (push --sign reads it alike).
    env_out = tmp_path / "env-out"
    by_env = run_cli([*argv, "-f", str(chain_dir / "Mergefile"), "export", "final-model",
                      str(env_out), "--sign"], cwd=tmp_path,
                     env={"MERGEBUILD_SIGNING_KEY": (tmp_path / "release.key").read_text()})
    assert by_env.returncode == 0, by_env.stderr
    assert run_cli(["verify", str(env_out), "--key", "release.pub"],
                   cwd=elsewhere).returncode == 0

    # A consistent forgery of weights and provenance keeps verifying without the key...
    other = tmp_path / "other"
    assert run_cli([*argv, "-f", str(chain_dir / "Mergefile"), "export", "chat-code",
                    str(other)], cwd=tmp_path).returncode == 0
    for path in other.iterdir():
        if not path.name.startswith("."):
            shutil.copyfile(path, env_out / path.name)
    assert run_cli(["verify", str(env_out)], cwd=elsewhere).returncode == 0
    # ...but not with it.
    forged = run_cli(["verify", str(env_out), "--key", "release.pub"], cwd=elsewhere)
    assert forged.returncode == 1
    assert ("provenance.dsse.json: bad-signature: provenance.json is not the statement that "
            "was signed") in forged.stdout
    assert run_cli(["keygen", "stranger"], cwd=tmp_path).returncode == 0
    wrong_key = run_cli(["verify", str(out), "--key", str(tmp_path / "stranger.pub")],
                        cwd=elsewhere)
    assert wrong_key.returncode == 1 and "is not signed by this key" in wrong_key.stdout
    unsigned = run_cli(["verify", str(other), "--key", "release.pub"], cwd=elsewhere)
    assert unsigned.returncode == 1 and "not signed (no provenance.dsse.json)" in unsigned.stdout
    bad_key = run_cli(["verify", str(out), "--key", str(tmp_path / "release.key")],
                      cwd=elsewhere)
    assert bad_key.returncode == 5 and len(bad_key.error_lines) == 1
    assert "is not a PEM public key" in bad_key.stderr
