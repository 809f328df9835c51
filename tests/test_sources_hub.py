"""Tests for mergebuild.sources.hub against a real, locally built Hugging Face cache (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils._safetensors import (
    SafetensorsFileMetadata,
    SafetensorsRepoMetadata,
    TensorInfo,
)
from safetensors.torch import save as save_safetensors

from mergebuild.sources import hub
from mergebuild.errors import CheckpointError, MergefileError, SourceError
from mergebuild.plan.lockfile import LockFile
from mergebuild.sources.hub import HubFile, HubResolution

A1 = "a1" * 20  # org/alpha, tag v1.0
A2 = "a2" * 20  # org/alpha, main
S1 = "5e" * 20  # org/sharded, main
P1 = "9c" * 20  # org/pickled, main
Q1 = "0d" * 20  # org/partial, main (a shard missing)
T1 = "7e" * 20  # org/treeonly, main (only config cached, tree listing cached)
NEW = "f0" * 20  # a commit only the (faked) hub knows
TOKEN = "hf_SuperSecretToken1234567890"


def _llama(seed: int, layers: int = 2, vocab: int = 32, hidden: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen)}
    for i in range(layers):
        tensors[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(
            hidden, hidden, generator=gen
        )
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(
            2 * hidden, hidden, generator=gen
        ).to(torch.bfloat16)
    tensors["lm_head.weight"] = torch.randn(vocab, hidden, generator=gen)
    return tensors


def _config(layers: int = 2, vocab: int = 32) -> bytes:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "hidden_size": 8,
    }
    return json.dumps(config).encode()


def _is_lfs(path: str) -> bool:
    return path.endswith((".safetensors", ".bin", ".model"))


class HubCache:
    """Writes repos into a directory with the exact layout huggingface_hub uses."""

    def __init__(self, root: Path):
        self.root = root
        self.contents: dict[tuple[str, str], dict[str, bytes]] = {}

    def repo_dir(self, repo_id: str) -> Path:
        return self.root / ("models--" + repo_id.replace("/", "--"))

    def add_commit(
        self, repo_id: str, commit: str, files: dict[str, bytes], *, link: bool = True
    ) -> Path:
        """Store blobs (LFS by sha256, others by git oid) and link them from the snapshot."""
        self.contents[(repo_id, commit)] = dict(files)
        repo = self.repo_dir(repo_id)
        snapshot = repo / "snapshots" / commit
        for path, data in files.items():
            blob = self.blob_name(path, data)
            (repo / "blobs").mkdir(parents=True, exist_ok=True)
            (repo / "blobs" / blob).write_bytes(data)
            if not link:
                continue
            target = snapshot / path
            target.parent.mkdir(parents=True, exist_ok=True)
            depth = path.count("/") + 2
            target.symlink_to(os.path.join(*[".."] * depth, "blobs", blob))
        snapshot.mkdir(parents=True, exist_ok=True)
        return snapshot

    def set_ref(self, repo_id: str, name: str, commit: str) -> None:
        ref = self.repo_dir(repo_id) / "refs" / name
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)

    def write_tree(self, repo_id: str, commit: str, files: dict[str, bytes]) -> None:
        """huggingface_hub's cached tree listing (trees/<commit>.json, format 1)."""
        entries = {}
        for path, data in files.items():
            entry = {"size": len(data), "blob_id": hub.git_blob_id(data)}
            if _is_lfs(path):
                entry.update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
            entries[path] = entry
        tree = self.repo_dir(repo_id) / "trees" / f"{commit}.json"
        tree.parent.mkdir(parents=True, exist_ok=True)
        tree.write_text(json.dumps({"format_version": 1, "files": entries}))

    @staticmethod
    def blob_name(path: str, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest() if _is_lfs(path) else hub.git_blob_id(data)

    def model_info(self, repo_id: str, commit: str, files: dict[str, bytes] | None = None):
        """What HfApi.model_info(files_metadata=True) returns for this content (API JSON shape)."""
        files = self.contents[(repo_id, commit)] if files is None else files
        siblings = []
        for path, data in files.items():
            sibling = {"rfilename": path, "size": len(data), "blobId": hub.git_blob_id(data)}
            if _is_lfs(path):
                sha = hashlib.sha256(data).hexdigest()
                sibling["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 134}
            siblings.append(sibling)
        return ModelInfo(id=repo_id, sha=commit, siblings=siblings, private=False, tags=[])


def offline_hub_cache(tmp_path, monkeypatch) -> HubCache:
    """An empty HF cache under tmp_path, selected through the environment, hub switched off.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into `constants` at import time,
    so both the environment (what mergebuild.sources.hub reads at call time) and the constants
    (what huggingface_hub itself reads) are patched.
    """
    root = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return HubCache(root)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> HubCache:
    """A populated HF cache, selected through the environment, with the hub switched off.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into `constants` at import time,
    so both the environment (what mergebuild.sources.hub reads at call time) and the constants
    (what huggingface_hub itself reads) are patched.
    """
    cache = offline_hub_cache(tmp_path, monkeypatch)

    tokenizer = json.dumps({"model": {"vocab": {str(i): i for i in range(32)}}}).encode()
    alpha_v1 = {
        "config.json": _config(),
        "model.safetensors": save_safetensors(_llama(1)),
        "tokenizer.json": tokenizer,
        "README.md": b"# alpha v1\n",
    }
    cache.add_commit("org/alpha", A1, alpha_v1)
    cache.add_commit(
        "org/alpha",
        A2,
        {
            **alpha_v1,
            "model.safetensors": save_safetensors(_llama(2)),
            "onnx/model.safetensors": save_safetensors({"x": torch.zeros(2)}),
            "README.md": b"# alpha v2\n",
        },
    )
    cache.set_ref("org/alpha", "main", A2)
    cache.set_ref("org/alpha", "v1.0", A1)

    # Two shards; the second is cut short after its header (its data never downloaded).
    tensors = _llama(3, layers=4)
    names = sorted(tensors)
    shard1 = {n: tensors[n] for n in names[: len(names) // 2]}
    shard2 = {n: tensors[n] for n in names[len(names) // 2 :]}
    index = {
        "metadata": {},
        "weight_map": {
            **{n: "model-00001-of-00002.safetensors" for n in shard1},
            **{n: "model-00002-of-00002.safetensors" for n in shard2},
        },
    }
    shard2_bytes = save_safetensors(shard2)
    header_len = int.from_bytes(shard2_bytes[:8], "little")
    cache.add_commit(
        "org/sharded",
        S1,
        {
            "config.json": _config(layers=4),
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": save_safetensors(shard1),
            "model-00002-of-00002.safetensors": shard2_bytes[: 8 + header_len + 4],
            "consolidated.safetensors": save_safetensors(tensors),
        },
    )
    cache.set_ref("org/sharded", "main", S1)

    pickled = tmp_path / "pytorch_model.bin.tmp"
    torch.save(_llama(4), pickled)
    pickled_bytes = pickled.read_bytes()
    pickled.unlink()
    cache.add_commit(
        "org/pickled",
        P1,
        {
            "config.json": _config(),
            "pytorch_model.bin": pickled_bytes,
            "training_args.bin": b"not weights",
        },
    )
    cache.set_ref("org/pickled", "main", P1)

    partial = cache.add_commit(
        "org/partial",
        Q1,
        {
            "config.json": _config(),
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": save_safetensors(shard1),
        },
    )
    assert not (partial / "model-00002-of-00002.safetensors").exists()
    cache.set_ref("org/partial", "main", Q1)

    tree_files = {"config.json": _config(), "model.safetensors": save_safetensors(_llama(5))}
    cache.add_commit("org/treeonly", T1, {"config.json": tree_files["config.json"]})
    cache.contents[("org/treeonly", T1)] = tree_files
    cache.write_tree("org/treeonly", T1, tree_files)
    cache.set_ref("org/treeonly", "main", T1)
    return cache


@pytest.fixture
def online(monkeypatch):
    """Switch the hub back on; every test must fake the huggingface_hub calls it makes."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls: list[tuple[str, tuple, dict]] = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append((name, args, kwargs))
            raise AssertionError(f"unexpected hub call {name}")

        return call

    monkeypatch.setattr(HfApi, "model_info", refuse("model_info"))
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", refuse("get_safetensors_metadata"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse("hf_hub_download"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse("snapshot_download"))
    return calls


def _fake_model_info(monkeypatch, answer):
    """Fake HfApi.model_info; ``answer(repo_id, revision)`` returns a ModelInfo or raises."""
    seen: list[dict] = []

    def model_info(self, repo_id, *, revision=None, files_metadata=False, **kwargs):
        seen.append({"repo_id": repo_id, "revision": revision, **kwargs})
        assert files_metadata, "file hashes need files_metadata=True"
        return answer(repo_id, revision)

    monkeypatch.setattr(HfApi, "model_info", model_info)
    return seen


def _http_error(cls, status: int):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/x")
    return cls("hub said no", response=httpx2.Response(status, request=request))


# --------------------------------------------------------------------------- the fixture itself


def test_fixture_is_a_cache_huggingface_hub_understands(hf_cache):
    info = huggingface_hub.scan_cache_dir(hf_cache.root)
    alpha = next(r for r in info.repos if r.repo_id == "org/alpha")
    assert {r.commit_hash for r in alpha.revisions} == {A1, A2}
    assert alpha.refs.keys() == {"main", "v1.0"}
    found = huggingface_hub.try_to_load_from_cache("org/alpha", "config.json", revision="v1.0")
    assert Path(found) == hf_cache.repo_dir("org/alpha") / "snapshots" / A1 / "config.json"
    snapshot = huggingface_hub.snapshot_download(
        "org/alpha", revision="main", cache_dir=hf_cache.root, allow_patterns=["*.json"]
    )
    assert Path(snapshot) == hf_cache.repo_dir("org/alpha") / "snapshots" / A2
    assert hub.hub_cache_dir() == hf_cache.root
    assert hub.is_offline()


# --------------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://org/name", ("org/name", None)),
        ("hf://org/name@main", ("org/name", "main")),
        ("hf://Org-1/Na_me.v2@v1.0", ("Org-1/Na_me.v2", "v1.0")),
        ("hf://gpt2", ("gpt2", None)),
        ("hf://org/name@refs/pr/3", ("org/name", "refs/pr/3")),
        (f"hf://org/name@{A1}", ("org/name", A1)),
    ],
)
def test_parse_hub_uri(uri, expected):
    assert hub.parse_hub_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("org/name", "is not a hub URI"),
        ("hf://", "does not name a valid hub repo"),
        ("hf://a/b/c", "does not name a valid hub repo"),
        ("hf://org--x/name", "does not name a valid hub repo"),
        ("hf://org/na..me", "does not name a valid hub repo"),
        ("hf://org/name.git", "does not name a valid hub repo"),
        ("hf://org/-name", "does not name a valid hub repo"),
        ("hf://org/name@", "has an invalid revision"),
        ("hf://org/name@a b", "has an invalid revision"),
        ("hf://org/name@../x", "has an invalid revision"),
    ],
)
def test_parse_hub_uri_rejects(uri, message):
    with pytest.raises(SourceError, match=message):
        hub.parse_hub_uri(uri, node="base")


# --------------------------------------------------------------------------- offline resolve


def test_resolve_branch_offline(hf_cache):
    res = hub.resolve("org/alpha", "main", node="base")
    assert res.commit == A2
    assert res.requested == "main"
    assert [f.path for f in res.files] == ["config.json", "model.safetensors", "tokenizer.json"]
    data = hf_cache.contents[("org/alpha", A2)]
    weights = res.file("model.safetensors")
    assert weights == HubFile(
        "model.safetensors",
        len(data["model.safetensors"]),
        sha256=hashlib.sha256(data["model.safetensors"]).hexdigest(),
    )
    assert res.file("config.json").blob_id == hub.git_blob_id(data["config.json"])
    assert res.file("config.json").sha256 is None
    table = {f.path: f.sha256 or f.blob_id for f in res.files}
    expected = hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode())
    assert res.digest == "sha256:" + expected.hexdigest()


def test_resolve_tag_and_default_offline(hf_cache):
    tag = hub.resolve("org/alpha", "v1.0", node="base")
    default = hub.resolve("org/alpha", None, node="base")
    assert tag.commit == A1
    assert default.commit == A2 and default.requested is None
    assert tag.digest != default.digest


def test_resolve_commit_offline_uses_the_snapshot(hf_cache):
    res = hub.resolve("org/alpha", A1, node="base")
    assert res.commit == A1 and res.requested == A1
    assert res.digest == hub.resolve("org/alpha", "v1.0", node="base").digest


def test_resolve_skips_subfolders_and_duplicate_consolidated_weights(hf_cache):
    res = hub.resolve("org/sharded", None, node="base")
    assert [f.path for f in res.files] == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


@pytest.mark.parametrize(
    ("repo", "revision"),
    [("org/nope", "main"), ("org/alpha", "dev"), ("org/alpha", "b0" * 20)],
)
def test_resolve_missing_offline_names_repo_and_revision(hf_cache, repo, revision):
    with pytest.raises(SourceError) as caught:
        hub.resolve(repo, revision, node="base")
    assert str(caught.value) == (
        f"node 'base': hf://{repo}@{revision} is not in the local Hugging Face cache and the hub "
        f"is unreachable (HF_HUB_OFFLINE=1) (run once online or `hf download {repo} --revision "
        f"{revision}`)"
    )


def test_resolve_incomplete_snapshot_offline(hf_cache):
    with pytest.raises(SourceError, match=r"lacks model-00002-of-00002\.safetensors"):
        hub.resolve("org/partial", "main", node="base")


def test_resolve_offline_prefers_the_cached_tree_listing(hf_cache):
    res = hub.resolve("org/treeonly", "main", node="base")
    weights = hf_cache.contents[("org/treeonly", T1)]["model.safetensors"]
    assert res.file("model.safetensors").sha256 == hashlib.sha256(weights).hexdigest()


def test_resolve_offline_without_weights_or_tree_is_missing(hf_cache):
    (hf_cache.repo_dir("org/treeonly") / "trees" / f"{T1}.json").unlink()
    with pytest.raises(SourceError, match="holds no weights"):
        hub.resolve("org/treeonly", "main", node="base")


def test_resolve_offline_argument_overrides_environment(hf_cache, online):
    res = hub.resolve("org/alpha", "main", node="base", offline=True)
    assert res.commit == A2
    assert online == []


# --------------------------------------------------------------------------- online resolve


def test_online_resolution_equals_cache_resolution(hf_cache, online, monkeypatch):
    seen = _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, A2))
    remote = hub.resolve("org/alpha", "main", node="base")
    assert seen == [{"repo_id": "org/alpha", "revision": "main"}]
    assert remote == hub.resolve("org/alpha", "main", node="base", offline=True)


def test_branch_moved_changes_commit_and_digest(hf_cache, online, monkeypatch):
    before = hub.resolve("org/alpha", "main", node="base", offline=True)
    moved = {
        **hf_cache.contents[("org/alpha", A2)],
        "model.safetensors": save_safetensors(_llama(9)),
    }
    _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, NEW, moved))
    after = hub.resolve("org/alpha", "main", node="base")
    assert after.commit == NEW and before.commit == A2
    assert after.digest != before.digest
    assert (
        after.file("model.safetensors").sha256
        == hashlib.sha256(moved["model.safetensors"]).hexdigest()
    )


def test_same_files_at_a_new_commit_keep_the_digest(hf_cache, online, monkeypatch):
    before = hub.resolve("org/alpha", "main", node="base", offline=True)
    same = {**hf_cache.contents[("org/alpha", A2)], "README.md": b"# edited readme\n"}
    _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, NEW, same))
    after = hub.resolve("org/alpha", "main", node="base")
    assert after.commit == NEW
    assert after.digest == before.digest


def test_locked_commit_is_honoured_online(hf_cache, online, monkeypatch):
    seen = _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, rev))
    res = hub.resolve("org/alpha", "main", node="base", locked_commit=A1)
    assert seen[0]["revision"] == A1
    assert res.commit == A1 and res.requested == "main"


def test_locked_commit_is_honoured_offline(hf_cache):
    res = hub.resolve("org/alpha", "main", node="base", locked_commit=A1)
    assert res.commit == A1
    assert res.digest == hub.resolve("org/alpha", "v1.0", node="base").digest


def test_resolve_validates_its_arguments(hf_cache):
    with pytest.raises(SourceError, match="has an invalid revision"):
        hub.resolve("org/alpha", "../../etc", node="base")
    with pytest.raises(SourceError, match="does not name a valid hub repo"):
        hub.resolve("../alpha", "main", node="base")


def test_locked_commit_must_be_a_sha(hf_cache):
    with pytest.raises(SourceError, match="is not a 40-character sha"):
        hub.resolve("org/alpha", "main", node="base", locked_commit="main")


def test_unreachable_hub_falls_back_to_cache(hf_cache, online, monkeypatch):
    def down(repo, rev):
        raise httpx2.ConnectError("connection refused")

    _fake_model_info(monkeypatch, down)
    assert hub.resolve("org/alpha", "v1.0", node="base").commit == A1
    with pytest.raises(SourceError, match=r"hf://org/nope@main is not in the local .*ConnectError"):
        hub.resolve("org/nope", "main", node="base")


def test_unknown_revision_on_the_hub(hf_cache, online, monkeypatch):
    def no_revision(repo, rev):
        raise _http_error(RevisionNotFoundError, 404)

    _fake_model_info(monkeypatch, no_revision)
    with pytest.raises(SourceError, match=r"hf://org/alpha@nightly: the revision does not exist"):
        hub.resolve("org/alpha", "nightly", node="base")


def test_private_repo_without_access(hf_cache, online, monkeypatch):
    def not_found(repo, rev):
        raise _http_error(RepositoryNotFoundError, 401)

    _fake_model_info(monkeypatch, not_found)
    with pytest.raises(SourceError) as caught:
        hub.resolve("org/secret", "main", node="base")
    assert "does not exist on the hub, or is private" in str(caught.value)
    assert "hf auth login" in str(caught.value)


# --------------------------------------------------------------------------- pickle


def test_pickle_only_repo_is_refused(hf_cache):
    with pytest.raises(SourceError, match=r"hf://org/pickled@main offers only pickle weights"):
        hub.resolve("org/pickled", "main", node="base")


def test_pickle_only_repo_is_refused_online(hf_cache, online, monkeypatch):
    _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, P1))
    with pytest.raises(SourceError, match="allow_pickle"):
        hub.resolve("org/pickled", "main", node="base")


def test_pickle_only_repo_allowed_with_flag(hf_cache):
    res = hub.resolve("org/pickled", "main", node="base", allow_pickle=True)
    assert [f.path for f in res.files] == ["config.json", "pytorch_model.bin"]
    assert res.is_pickle
    config, tensors = hub.read_metadata(res, node="base")
    assert config["num_hidden_layers"] == 2
    assert tensors["model.layers.1.mlp.up_proj.weight"] == ("BF16", (16, 8))
    assert tensors["lm_head.weight"] == ("F32", (32, 8))


# --------------------------------------------------------------------------- metadata


def test_read_metadata_from_cache(hf_cache, online):
    res = hub.resolve("org/alpha", "main", node="base", offline=True)
    config, tensors = hub.read_metadata(res, node="base")
    assert config["vocab_size"] == 32
    assert tensors == {name: (
        "BF16" if t.dtype == torch.bfloat16 else "F32", tuple(t.shape)
    ) for name, t in _llama(2).items()}  # fmt: skip
    assert online == []


def test_read_metadata_reads_only_headers(hf_cache):
    res = hub.resolve("org/sharded", "main", node="base")
    config, tensors = hub.read_metadata(res, node="base")
    assert config["num_hidden_layers"] == 4
    assert len(tensors) == len(_llama(3, layers=4))
    assert tensors["model.layers.3.self_attn.q_proj.weight"] == ("F32", (8, 8))
    assert tensors["model.embed_tokens.weight"] == ("F32", (32, 8))


def test_read_metadata_remote_without_downloading_weights(hf_cache, online, monkeypatch, tmp_path):
    files = {"config.json": _config(layers=3, vocab=48), "model.safetensors": b"x" * 1000}
    _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, NEW, files))
    res = hub.resolve("org/remote", "main", node="base")
    downloads = []

    def hf_hub_download(repo_id, filename, *, revision=None, cache_dir=None, **kwargs):
        downloads.append((repo_id, filename, revision, cache_dir))
        path = tmp_path / filename
        path.write_bytes(files[filename])
        return str(path)

    def get_safetensors_metadata(self, repo_id, *, revision=None, **kwargs):
        assert (repo_id, revision) == ("org/remote", NEW)
        tensors = {"lm_head.weight": TensorInfo(dtype="BF16", shape=[48, 8], data_offsets=(0, 768))}
        return SafetensorsRepoMetadata(
            metadata=None,
            sharded=False,
            weight_map={"lm_head.weight": "model.safetensors"},
            files_metadata={
                "model.safetensors": SafetensorsFileMetadata(metadata={}, tensors=tensors)
            },
        )

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", get_safetensors_metadata)
    config, tensors = hub.read_metadata(res, node="base")
    assert config["num_hidden_layers"] == 3
    assert tensors == {"lm_head.weight": ("BF16", (48, 8))}
    assert downloads == [("org/remote", "config.json", NEW, str(hf_cache.root))]


def test_read_metadata_checks_remote_headers_like_local_ones(hf_cache, online, monkeypatch,
                                                            tmp_path):
    files = {"config.json": _config(layers=3, vocab=48), "model.safetensors": b"x" * 1000}
    _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, NEW, files))
    res = hub.resolve("org/remote", "main", node="base")

    def hf_hub_download(repo_id, filename, *, revision=None, cache_dir=None, **kwargs):
        path = tmp_path / filename
        path.write_bytes(files[filename])
        return str(path)

    def get_safetensors_metadata(self, repo_id, *, revision=None, **kwargs):
        # 48x8 BF16 is 768 bytes, but the header claims 2000: past the 1000-byte file.
        tensors = {"lm_head.weight": TensorInfo(dtype="BF16", shape=[48, 8],
                                                data_offsets=(0, 2000))}
        return SafetensorsRepoMetadata(
            metadata=None, sharded=False, weight_map={"lm_head.weight": "model.safetensors"},
            files_metadata={"model.safetensors": SafetensorsFileMetadata(metadata={},
                                                                         tensors=tensors)},
        )

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", get_safetensors_metadata)
    with pytest.raises(CheckpointError, match="data_offsets span 2000 bytes") as caught:
        hub.read_metadata(res, node="base")
    assert caught.value.node == "base"


def test_read_metadata_offline_without_weights(hf_cache, online, monkeypatch):
    files = {"config.json": _config(), "model.safetensors": b"x" * 10}
    _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, NEW, files))
    res = hub.resolve("org/remote", "main", node="base")
    with pytest.raises(
        SourceError, match=r"hf://org/remote@f0f0.*config\.json is not in the local"
    ):
        hub.read_metadata(res, node="base", offline=True)


# --------------------------------------------------------------------------- fetch


def test_fetch_cached_snapshot_offline(hf_cache):
    res = hub.resolve("org/alpha", "main", node="base")
    snapshot = hub.fetch(res, node="base")
    assert snapshot == hf_cache.repo_dir("org/alpha") / "snapshots" / A2
    data = hf_cache.contents[("org/alpha", A2)]
    assert (snapshot / "model.safetensors").read_bytes() == data["model.safetensors"]


def test_fetch_offline_missing_files(hf_cache):
    files = hf_cache.contents[("org/treeonly", T1)]
    res = hub.resolve("org/treeonly", "main", node="base")
    assert res.file("model.safetensors").size == len(files["model.safetensors"])
    with pytest.raises(SourceError, match=r"hf://org/treeonly@7e7e.* missing model\.safetensors"):
        hub.fetch(res, node="base")


def test_fetch_downloads_exactly_the_commit(hf_cache, online, monkeypatch):
    files = {
        "config.json": _config(),
        "model.safetensors": save_safetensors(_llama(7)),
        "README.md": b"hello",
    }
    _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, NEW, files))
    res = hub.resolve("org/fresh", "main", node="base")
    calls = []

    def snapshot_download(
        repo_id, *, revision=None, cache_dir=None, allow_patterns=None, tqdm_class=None, **kw
    ):
        calls.append((repo_id, revision, cache_dir, allow_patterns))
        wanted = {p: files[p] for p in allow_patterns}
        total = sum(len(d) for d in wanted.values())
        bar = tqdm_class(desc="Downloading bytes", total=total, unit="B", name="hf")
        for data in wanted.values():
            bar.update(len(data))
        bar.close()
        return str(hf_cache.add_commit(repo_id, revision, wanted))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    reports = []
    snapshot = hub.fetch(res, node="base", progress=lambda *a: reports.append(a))
    assert calls == [("org/fresh", NEW, str(hf_cache.root), ["config.json", "model.safetensors"])]
    assert snapshot == hf_cache.repo_dir("org/fresh") / "snapshots" / NEW
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "model.safetensors"]
    total = len(files["config.json"]) + len(files["model.safetensors"])
    assert reports[-1] == ("org/fresh: Downloading bytes", total, total)


def test_fetch_detects_size_mismatch(hf_cache):
    res = hub.resolve("org/alpha", "main", node="base")
    weights = res.file("model.safetensors")
    wrong = dataclasses.replace(
        res,
        files=tuple(
            dataclasses.replace(f, size=f.size + 1) if f is weights else f for f in res.files
        ),
    )
    with pytest.raises(
        SourceError, match=rf"model\.safetensors is {weights.size} bytes in the cache"
    ):
        hub.fetch(wrong, node="base")


def test_fetch_detects_blob_mismatch(hf_cache):
    res = hub.resolve("org/alpha", "main", node="base")
    other = hub.resolve("org/alpha", "v1.0", node="base").file("model.safetensors")
    wrong = dataclasses.replace(
        res,
        files=tuple(
            dataclasses.replace(f, sha256=other.sha256) if f.path == "model.safetensors" else f
            for f in res.files
        ),
    )
    with pytest.raises(SourceError, match="cached model.safetensors has sha256"):
        hub.fetch(wrong, node="base")


# --------------------------------------------------------------------------- token


def test_token_never_appears_in_a_resolution_or_error(hf_cache, online, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    seen = _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, A2))
    res = hub.resolve("org/alpha", "main", node="base")
    assert "token" not in seen[0]
    assert TOKEN not in repr(res)
    assert TOKEN not in json.dumps(res.to_json())

    def leaky(repo, rev):
        raise httpx2.ConnectError(f"proxy refused Authorization: Bearer {TOKEN}")

    _fake_model_info(monkeypatch, leaky)
    with pytest.raises(SourceError) as caught:
        hub.resolve("org/nope", "main", node="base")
    assert TOKEN not in str(caught.value)
    assert "ConnectError" in str(caught.value)


# --------------------------------------------------------------------------- JSON and lock


def test_resolution_json_round_trip(hf_cache):
    res = hub.resolve("org/alpha", "v1.0", node="base")
    data = json.loads(json.dumps(res.to_json()))
    assert data["uri"] == "hf://org/alpha@v1.0"
    assert HubResolution.from_json(data) == res


def test_resolution_from_json_rejects_an_edited_entry(hf_cache):
    data = hub.resolve("org/alpha", "v1.0", node="base").to_json()
    data["files"][1]["sha256"] = "0" * 64
    with pytest.raises(SourceError, match="does not match its own digest"):
        HubResolution.from_json(data, node="base")


def test_lock_file_round_trip(hf_cache, tmp_path):
    path = tmp_path / "Mergefile.lock"
    assert LockFile.load(path).nodes() == []
    lock = LockFile()
    lock.set("base", hub.resolve("org/alpha", "main", node="base"))
    lock.set("tuned", hub.resolve("org/sharded", None, node="tuned"))
    lock.save(path)
    assert sorted(os.listdir(tmp_path)) == ["Mergefile.lock", "hf"]
    loaded = LockFile.load(path)
    assert loaded == lock
    assert loaded.get("base").commit == A2
    assert loaded.get("base", uri="hf://org/alpha@main") is not None
    assert loaded.get("base", uri="hf://org/alpha@v1.0") is None
    assert loaded.get("missing") is None
    assert json.loads(path.read_text())["sources"]["tuned"]["uri"] == "hf://org/sharded"


def test_lock_file_resolution_keeps_the_old_commit(hf_cache, online, monkeypatch, tmp_path):
    path = tmp_path / "Mergefile.lock"
    lock = LockFile()
    lock.set("base", hub.resolve("org/alpha", "v1.0", node="base", offline=True))
    lock.save(path)
    _fake_model_info(monkeypatch, lambda repo, rev: hf_cache.model_info(repo, rev))
    locked = LockFile.load(path).get("base")
    again = hub.resolve("org/alpha", "v1.0", node="base", locked_commit=locked.commit)
    assert again == locked


def test_corrupt_lock_file(tmp_path):
    path = tmp_path / "Mergefile.lock"
    path.write_text("{not json")
    with pytest.raises(MergefileError, match="Mergefile.lock:1: lock file is not valid JSON"):
        LockFile.load(path)
