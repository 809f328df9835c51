"""The store refuses a published object that fails the cheap integrity check; make rebuilds it."""

from __future__ import annotations

import os

import pytest
from conftest import CHAIN, outcomes

from mergebuild.provenance.integrity import verify_directory


def _open(path):
    """Objects are read-only: open the directory (and the file, if present) for damage."""
    os.chmod(path.parent, 0o755)
    if path.exists():
        os.chmod(path, 0o644)
    return path


@pytest.mark.parametrize("damage", [
    lambda d: _open(d / "model.safetensors").unlink(),
    lambda d: os.truncate(_open(d / "model.safetensors"), 123),
    lambda d: _open(d / "stray.safetensors").write_bytes(b"x"),
], ids=["missing", "resized", "unexpected"])
def test_corrupt_object_is_absent_discarded_and_rebuilt(workspace, damage):
    workspace.chain()
    workspace.project().make(["chat-code"])
    project = workspace.project()
    old = project.path("chat-code")
    damage(old)
    assert project.store.lookup(old.name) is None
    state = next(s for s in project.plan(["chat-code"]) if s.name == "chat-code")
    assert (state.status, state.reasons) == ("stale", ["output corrupt or incomplete in the store"])
    result = project.make(["chat-code"])
    assert outcomes(result) == {"chat-code": "built"}
    assert result.results[0].detail == "output corrupt or incomplete in the store"
    rebuilt = workspace.project().path("chat-code")
    assert rebuilt == old  # same key, same place; the damaged copy was discarded
    assert verify_directory(rebuilt) == []
    assert not list((workspace.cache / "tmp").iterdir())


def test_flipped_byte_is_noticed_by_make_and_rebuilt(workspace):
    # Same-size damage through the file system changes the file's stat signature: make
    # re-hashes that file against the store's publish record, finds it corrupt, rebuilds.
    workspace.write(CHAIN)
    workspace.project().make(["chat-code"])
    path = workspace.project().path("chat-code")
    weights = _open(path / "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    project = workspace.project()
    assert project.store.lookup(path.name) is None
    assert project.store.problem(path.name) == (
        "model.safetensors: content differs from what was published")
    state = next(s for s in project.plan(["chat-code"]) if s.name == "chat-code")
    assert state.reasons == ["output corrupt or incomplete in the store"]
    assert outcomes(project.make(["chat-code"])) == {"chat-code": "built"}
    assert verify_directory(path) == []
    assert workspace.project().store.lookup(path.name) is not None


def test_unchanged_object_is_reused_without_reading_its_weights(workspace, monkeypatch):
    # The signature check is cheap: a fresh object's files are not re-read.
    workspace.write(CHAIN)
    workspace.project().make(["chat-code"])
    from mergebuild.io import hashing

    def no_reads(path):
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(hashing, "file_xxh128", no_reads)
    project = workspace.project()
    assert outcomes(project.make(["chat-code"])) == {"chat-code": "fresh"}
