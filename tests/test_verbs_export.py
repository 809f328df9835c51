"""`mergebuild export` and `push`: a verified, self-contained copy; the hub faked at its API."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
import pytest
from click.testing import CliRunner
from conftest import CHAIN

from mergebuild.cli import main
from mergebuild.provenance.integrity import verify_directory

TOKEN = "hf_" + "S3cr3tT0kenValue" * 3


def run(ws, *args):
    return CliRunner().invoke(main, ["-f", str(ws.mergefile), "--cache-dir", str(ws.cache),
                                     *args], obj={})


@pytest.fixture
def chat_code(workspace) -> Path:
    workspace.write(CHAIN)
    workspace.project().make(["chat-code"])
    return workspace.project().path("chat-code")


def tamper(build: Path) -> None:
    os.chmod(build, 0o755)
    weights = build / "model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))


def test_export_copies_a_self_contained_writable_model(workspace, chat_code, tmp_path):
    dest = tmp_path / "release" / "chat-code"
    result = run(workspace, "export", "chat-code", str(dest))
    assert result.exit_code == 0, result.output
    # The build's files, and card.json: the card goes out with the parents' licences applied.
    names = sorted([p.name for p in chat_code.iterdir()] + ["card.json"])
    assert result.output == f"chat-code: exported {len(names)} files to {dest}\n"
    assert sorted(p.name for p in dest.iterdir()) == [".mergebuild-export", *names]
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md",
            "provenance.json"} <= set(names)
    assert all(os.access(p, os.W_OK) for p in [dest, *dest.iterdir()])
    assert verify_directory(dest) == []
    assert [p.name for p in dest.parent.iterdir()] == ["chat-code"]  # no staging left


def test_exported_model_loads_with_transformers(workspace, chat_code, tmp_path):
    transformers = pytest.importorskip("transformers")
    run(workspace, "export", "chat-code", str(tmp_path / "out"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 4


def test_export_replaces_only_an_earlier_export_and_only_when_forced(workspace, chat_code,
                                                                      tmp_path):
    dest = tmp_path / "out"
    assert run(workspace, "export", "chat-code", str(dest)).exit_code == 0
    (dest / "old.txt").write_text("left by the earlier export's user")
    result = run(workspace, "export", "chat-code", str(dest))
    assert result.exit_code == 1
    assert result.output == (f"mergebuild: error: node 'chat-code': {dest} is not empty "
                             "(pass --force to replace an earlier export, or pick an empty "
                             "directory)\n")
    forced = run(workspace, "export", "--force", "chat-code", str(dest))
    assert forced.exit_code == 0, forced.output
    assert not (dest / "old.txt").exists() and verify_directory(dest) == []
    assert not list(tmp_path.glob(".out.*"))  # no staging or old copy left


def test_export_refuses_a_build_that_fails_verification(workspace, chat_code, tmp_path):
    tamper(chat_code)
    result = run(workspace, "export", "chat-code", str(tmp_path / "out"))
    assert result.exit_code == 4
    assert "the build does not match its provenance: model.safetensors: modified" in result.output
    assert "make rebuilds a corrupt store object" in result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    # ... and the hint is true: make notices the damage and rebuilds the object.
    assert "built chat-code" in run(workspace, "make", "chat-code").output
    assert run(workspace, "export", "chat-code", str(tmp_path / "out")).exit_code == 0


class FakeHub:
    """Records what mergebuild asks of ``HfApi``; never touches the network."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: list[str] = []
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        for name in ("create_repo", "create_branch", "upload_folder"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, self._recorder(name))

    def _recorder(self, name):
        def call(api, *args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                self.uploaded = sorted(p.name for p in folder.iterdir())
                self.card = (folder / "README.md").read_text()
                return huggingface_hub.CommitInfo(
                    commit_url="https://huggingface.co/me/merged/commit/abc123",
                    commit_message=kwargs["commit_message"], commit_description="",
                    oid="abc123")
            return None

        return call


def test_push_creates_the_repo_and_uploads_the_verified_build(workspace, chat_code,
                                                              monkeypatch):
    hub = FakeHub(monkeypatch)
    result = run(workspace, "push", "chat-code", "me/merged", "--private")
    assert result.exit_code == 0, result.output
    assert result.output == "chat-code: pushed to https://huggingface.co/me/merged/commit/abc123\n"
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    create = hub.calls[0]
    assert create[1] == ("me/merged",) and create[2]["private"] is True
    upload = hub.calls[1][2]
    assert (upload["repo_id"], upload["revision"]) == ("me/merged", None)
    assert upload["commit_message"].startswith("mergebuild: chat-code (sha256:")
    # The build's files (linked, not copied), with the presented card and its card.json.
    assert hub.uploaded == sorted([p.name for p in chat_code.iterdir()] + ["card.json"])
    assert hub.card == workspace.project().card("chat-code").text
    assert "## Licence" in hub.card
    assert TOKEN not in result.output


def test_push_to_a_revision_creates_the_branch(workspace, chat_code, monkeypatch):
    hub = FakeHub(monkeypatch)
    result = run(workspace, "push", "chat-code", "me/merged", "--revision", "v2")
    assert result.exit_code == 0, result.output
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[1][2]["branch"] == "v2" and hub.calls[2][2]["revision"] == "v2"


def test_push_refuses_a_tampered_build(workspace, chat_code, monkeypatch):
    hub = FakeHub(monkeypatch)
    tamper(chat_code)
    result = run(workspace, "push", "chat-code", "me/merged")
    assert result.exit_code == 4
    assert "refusing to push" in result.output and hub.calls == []


def test_a_hub_failure_is_one_line_without_the_token(workspace, chat_code, monkeypatch):
    FakeHub(monkeypatch)

    def denied(api, *args, **kwargs):
        raise OSError(f"401 Client Error: invalid credentials for token {TOKEN}\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", denied)
    result = run(workspace, "push", "chat-code", "me/merged")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("mergebuild: error: node 'chat-code': cannot push to "
                                    "me/merged: 401 Client Error: invalid credentials")
    assert TOKEN not in result.output and "[REDACTED]" in result.output
