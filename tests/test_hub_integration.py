"""Hub sources end to end through plan/make, offline, over a real Hugging Face cache layout."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import HfApi, constants
from huggingface_hub.utils._safetensors import (
    SafetensorsFileMetadata,
    SafetensorsRepoMetadata,
    TensorInfo,
)
from test_sources_hub import HubCache, offline_hub_cache

from mergebuild.sources import hub
from mergebuild.cli import main
from mergebuild.sources.demo import Delta, generate_model
from mergebuild.errors import IncompatibleModelsError, SourceError
from mergebuild.api import Project
from mergebuild.build.events import Reporter
from mergebuild.provenance.statement import read_statement

B1 = "b1" * 20  # org/base, main
I1 = "11" * 20  # org/instruct, main
I2 = "12" * 20  # org/instruct, a later commit with other weights (cached, no ref)
W1 = "3a" * 20  # org/wide-vocab: vocab 300, only known to the (faked) hub
L1 = "2b" * 20  # org/shallow: 2 layers, only known to the (faked) hub
P1 = "9c" * 20  # org/pickled: pytorch_model.bin only
NEW = "f0" * 20
TOKEN = "hf_secretTokenThatMustNeverLeak12345"

CHAIN = """\
version: 1
models:
  base: {source: "hf://org/base@main"}
  instruct: {source: "hf://org/instruct"}
  tuned:
    merge_method: task_arithmetic
    base_model: base
    models:
      - model: instruct
        parameters: {weight: 1.0}
"""


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())
            if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """File contents of real tiny Llama checkpoints: two fine-tunes and two misfits."""
    root = tmp_path_factory.mktemp("hub-models")
    dirs = {
        "base": generate_model(root / "base", 0),
        "instruct": generate_model(root / "instruct", 0, deltas=[Delta(seed=1)]),
        "instruct2": generate_model(root / "instruct2", 0, deltas=[Delta(seed=2)]),
        "wide": generate_model(root / "wide", 0, vocab_size=300),
        "shallow": generate_model(root / "shallow", 0, num_layers=2),
    }
    return {name: _files(d) for name, d in dirs.items()}


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_models) -> HubCache:
    """A populated HF cache with the hub switched off (HF_HUB_OFFLINE=1)."""
    hc = offline_hub_cache(tmp_path, monkeypatch)
    monkeypatch.delenv("MERGEBUILD_CACHE", raising=False)
    hc.add_commit("org/base", B1, tiny_models["base"])
    hc.set_ref("org/base", "main", B1)
    hc.add_commit("org/instruct", I1, tiny_models["instruct"])
    hc.add_commit("org/instruct", I2, tiny_models["instruct2"])
    hc.set_ref("org/instruct", "main", I1)
    import torch
    from safetensors.torch import load as load_safetensors

    pickled = tmp_path / "pytorch_model.bin"
    torch.save(load_safetensors(tiny_models["instruct"]["model.safetensors"]), pickled)
    side = {k: v for k, v in tiny_models["instruct"].items() if not k.endswith(".safetensors")}
    hc.add_commit("org/pickled", P1, {**side, "pytorch_model.bin": pickled.read_bytes()})
    hc.set_ref("org/pickled", "main", P1)
    pickled.unlink()
    return hc


class Calls:
    """Spies on every way weights could be downloaded."""

    def __init__(self, monkeypatch):
        self.fetch: list[str] = []
        self.snapshot_download: list[tuple] = []
        real_fetch = hub.fetch

        def fetch(resolution, **kwargs):
            self.fetch.append(resolution.repo_id)
            return real_fetch(resolution, **kwargs)

        monkeypatch.setattr(hub, "fetch", fetch)

        def snapshot_download(*args, **kwargs):
            self.snapshot_download.append((args, kwargs))
            raise AssertionError("snapshot_download must not be called")

        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.fixture
def calls(monkeypatch) -> Calls:
    return Calls(monkeypatch)


def _go_online(monkeypatch, cache: HubCache, answers: dict[str, tuple[str, dict[str, bytes]]]):
    """The hub is up and answers model_info for ``answers`` {repo: (commit, files)}."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked: list[tuple[str, str | None]] = []

    def model_info(self, repo_id, *, revision=None, files_metadata=False, **kwargs):
        assert files_metadata
        assert "token" not in kwargs
        asked.append((repo_id, revision))
        commit, files = answers[repo_id]
        return cache.model_info(repo_id, commit, files)

    monkeypatch.setattr(HfApi, "model_info", model_info)
    return asked


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "Mergefile"
    path.write_text(textwrap.dedent(text))
    return path


def _project(tmp_path: Path, **kwargs) -> Project:
    return Project(tmp_path / "Mergefile", tmp_path / "cache", **kwargs)


def _cli(tmp_path: Path, *args: str):
    runner = CliRunner()
    return runner.invoke(main, ["-f", str(tmp_path / "Mergefile"), "--cache-dir",
                                str(tmp_path / "cache"), *args], obj={})


def _states(project: Project, *targets: str):
    return {s.name: s for s in project.plan(list(targets))}


def _outcomes(result) -> dict[str, str]:
    return {r.name: r.outcome for r in result.results}


# --------------------------------------------------------------------------- offline plan/make


def test_offline_plan_shows_resolved_commits(cache, calls, tmp_path):
    _write(tmp_path, CHAIN)
    states = _states(_project(tmp_path))
    assert states["base"].source.commit == B1
    assert states["instruct"].source.commit == I1
    assert states["tuned"].status == "stale" and states["tuned"].reasons == ["new node"]
    text = _cli(tmp_path, "plan")
    assert text.exit_code == 0, text.output
    assert f"hf://org/base@main → {B1[:12]}" in text.output
    assert f"hf://org/instruct@main → {I1[:12]}" in text.output
    rows = {r["node"]: r for r in json.loads(_cli(tmp_path, "plan", "--json").output)}
    assert (rows["base"]["commit"], rows["base"]["revision"]) == (B1, "main")
    assert (rows["instruct"]["commit"], rows["instruct"]["revision"]) == (I1, None)
    assert calls.fetch == [] and not (tmp_path / "Mergefile.lock").exists()


def test_offline_make_records_commits_and_file_hashes(cache, tmp_path):
    _write(tmp_path, CHAIN)
    result = _project(tmp_path).make()
    assert _outcomes(result) == {"tuned": "built"}
    out = result.results[0].path
    deps = {d["name"]: d for d in
            read_statement(out)["predicate"]["buildDefinition"]["resolvedDependencies"]}
    for node, repo, commit, model in (("base", "org/base", B1, "base"),
                                      ("instruct", "org/instruct", I1, "instruct")):
        dep = deps[node]
        data = cache.contents[(repo, commit)]["model.safetensors"]
        import hashlib

        assert dep["annotations"]["commit"] == commit
        assert dep["digest"]["gitCommit"] == commit
        assert dep["annotations"]["files"]["model.safetensors"] == (
            "sha256:" + hashlib.sha256(data).hexdigest())
    assert deps["base"]["annotations"]["revision"] == "main"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/base", "org/instruct"]
    lock = json.loads((tmp_path / "Mergefile.lock").read_text())
    assert lock["sources"]["base"]["commit"] == B1
    assert lock["sources"]["instruct"]["uri"] == "hf://org/instruct"
    assert lock["sources"]["instruct"]["commit"] == I1
    # tokenizer files are linked into the cache's blobs/ and still copied from the donor
    assert (out / "tokenizer.json").read_bytes() == cache.contents[("org/base", B1)][
        "tokenizer.json"]


def test_fresh_nodes_fetch_nothing(cache, calls, tmp_path):
    _write(tmp_path, CHAIN)
    _project(tmp_path).make()
    assert sorted(calls.fetch) == ["org/base", "org/instruct"]
    calls.fetch.clear()
    assert _outcomes(_project(tmp_path).make()) == {"tuned": "fresh"}
    assert calls.fetch == []


def test_hub_ids_written_as_parents_become_sources(cache, tmp_path):
    _write(tmp_path, """\
        version: 1
        models:
          tuned:
            merge_method: task_arithmetic
            base_model: hf://org/base
            models:
              - model: org/instruct@main
                parameters: {weight: 0.5}
        """)
    states = _states(_project(tmp_path))
    assert states["org/instruct@main"].source.commit == I1
    assert states["hf://org/base"].source.commit == B1
    result = _project(tmp_path).make()
    assert _outcomes(result) == {"tuned": "built"}
    lock = json.loads((tmp_path / "Mergefile.lock").read_text())
    assert sorted(lock["sources"]) == ["hf://org/base", "org/instruct@main"]
    front = yaml.safe_load((result.results[0].path / "README.md").read_text().split("---")[1])
    assert front["base_model"] == ["org/base", "org/instruct"]


def test_missing_repo_offline_is_one_line_naming_repo_and_revision(cache, tmp_path):
    _write(tmp_path, CHAIN.replace("hf://org/instruct", "hf://org/nope@dev"))
    with pytest.raises(SourceError, match=r"hf://org/nope@dev is not in the local Hugging Face"):
        _project(tmp_path).plan()
    run = _cli(tmp_path, "make")
    assert run.exit_code == SourceError.exit_code
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith("mergebuild: error: node 'instruct': hf://org/nope@dev ")
    assert not (tmp_path / "cache" / "objects").exists() or not any(
        (tmp_path / "cache" / "objects").iterdir())


# --------------------------------------------------------------------------- moving branches


def test_branch_moved_makes_dependants_stale(cache, calls, tmp_path, monkeypatch, tiny_models):
    _write(tmp_path, CHAIN)
    _project(tmp_path).make()
    _go_online(monkeypatch, cache, {"org/base": (B1, tiny_models["base"]),
                                    "org/instruct": (I2, tiny_models["instruct2"])})
    states = _states(_project(tmp_path))
    assert states["instruct"].source.commit == I2
    assert states["instruct"].reasons == [
        f"changed: hf://org/instruct moved {I1[:12]} → {I2[:12]}"]
    assert states["base"].reasons == []
    assert states["tuned"].status == "stale"
    assert states["tuned"].reasons == ["parent changed: instruct"]
    plan = _cli(tmp_path, "plan")
    assert "parent changed: instruct" in plan.output
    assert f"changed: hf://org/instruct moved {I1[:12]}" in plan.output
    assert _outcomes(_project(tmp_path).make()) == {"tuned": "built"}  # I2 is cached
    lock = json.loads((tmp_path / "Mergefile.lock").read_text())
    assert lock["sources"]["instruct"]["commit"] == I2
    assert calls.snapshot_download == []


def test_new_commit_with_same_files_rebuilds_nothing(cache, tmp_path, monkeypatch, tiny_models):
    _write(tmp_path, CHAIN)
    _project(tmp_path).make()
    same = {**tiny_models["instruct"], "README.md": b"# only the readme changed\n"}
    _go_online(monkeypatch, cache, {"org/base": (B1, tiny_models["base"]),
                                    "org/instruct": (NEW, same)})
    states = _states(_project(tmp_path))
    assert states["instruct"].source.commit == NEW
    assert states["instruct"].reasons == [
        f"hf://org/instruct moved {I1[:12]} → {NEW[:12]} (same files)"]
    assert states["tuned"].status == "fresh"


def test_frozen_keeps_the_locked_commits(cache, calls, tmp_path, monkeypatch, tiny_models):
    _write(tmp_path, CHAIN)
    _project(tmp_path).make()
    lock_before = (tmp_path / "Mergefile.lock").read_text()
    asked = _go_online(monkeypatch, cache, {"org/base": (B1, tiny_models["base"]),
                                            "org/instruct": (I2, tiny_models["instruct2"])})
    states = _states(_project(tmp_path, frozen=True))
    assert states["instruct"].source.commit == I1
    assert states["tuned"].status == "fresh"
    run = _cli(tmp_path, "make", "--frozen")
    assert run.exit_code == 0, run.output
    assert "nothing to do" in run.output
    plan = _cli(tmp_path, "plan", "--frozen")
    assert f"→ {I1[:12]}" in plan.output and "nothing to do" in plan.output
    assert asked == []  # --frozen never asks the hub
    assert (tmp_path / "Mergefile.lock").read_text() == lock_before
    assert _states(_project(tmp_path))["tuned"].status == "stale"  # without --frozen


def test_frozen_without_lock_entry_names_the_node(cache, tmp_path):
    _write(tmp_path, CHAIN)
    with pytest.raises(SourceError) as caught:
        _project(tmp_path, frozen=True).plan()
    assert str(caught.value).startswith(
        "node 'base': hf://org/base@main is not locked in Mergefile.lock (--frozen)")
    run = _cli(tmp_path, "plan", "--frozen")
    assert run.exit_code == SourceError.exit_code
    assert "node 'base'" in run.stderr


# --------------------------------------------------------------------------- pickle


def test_pickle_only_repo_is_refused(cache, tmp_path):
    _write(tmp_path, CHAIN.replace("hf://org/instruct", "hf://org/pickled"))
    run = _cli(tmp_path, "plan")
    assert run.exit_code == SourceError.exit_code
    assert "hf://org/pickled@main offers only pickle weights" in run.stderr
    assert "allow_pickle" in run.stderr


def test_pickle_repo_with_opt_in_builds_the_same_model(cache, tmp_path):
    _write(tmp_path, CHAIN)
    reference = _project(tmp_path).make().results[0].path
    other = tmp_path / "pickled"
    other.mkdir()
    _write(other, CHAIN.replace('instruct: {source: "hf://org/instruct"}',
                                'instruct: {source: "hf://org/pickled", allow_pickle: true}'))
    result = _project(other).make()
    assert _outcomes(result) == {"tuned": "built"}
    from safetensors.torch import load_file
    from torch.testing import assert_close

    got = load_file(result.results[0].path / "model.safetensors")
    want = load_file(reference / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], rtol=0, atol=0)


# --------------------------------------------------------------------------- validation


def _remote_repo(monkeypatch, cache: HubCache, repo: str, commit: str, files: dict[str, bytes],
                 tmp_path: Path) -> list[str]:
    """A repo only the hub has: config.json by download, headers by range requests."""
    downloads: list[str] = []

    def hf_hub_download(repo_id, filename, *, revision=None, cache_dir=None, **kwargs):
        assert (repo_id, revision) == (repo, commit)
        assert not filename.endswith(".safetensors"), "weights must not be downloaded"
        downloads.append(filename)
        path = tmp_path / "dl" / filename
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(files[filename])
        return str(path)

    def get_safetensors_metadata(self, repo_id, *, revision=None, **kwargs):
        assert (repo_id, revision) == (repo, commit)
        raw = files["model.safetensors"]
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__", None)
        tensors = {n: TensorInfo(dtype=e["dtype"], shape=e["shape"],
                                 data_offsets=tuple(e["data_offsets"]))
                   for n, e in header.items()}
        return SafetensorsRepoMetadata(
            metadata=None, sharded=False,
            weight_map=dict.fromkeys(tensors, "model.safetensors"),
            files_metadata={"model.safetensors": SafetensorsFileMetadata(metadata={},
                                                                         tensors=tensors)})

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(HfApi, "get_safetensors_metadata", get_safetensors_metadata)
    return downloads


@pytest.mark.parametrize(
    ("repo", "commit", "model", "message"),
    [
        ("org/wide-vocab", W1, "wide",
         "node 'tuned': vocabulary mismatch: 'base' has 256 tokens, 'instruct' has 300"),
        ("org/shallow", L1, "shallow",
         "node 'tuned': layer count mismatch: 'base' has 4 layers, 'instruct' has 2"),
    ],
)
def test_incompatible_parents_fail_before_any_download(
    cache, calls, tmp_path, monkeypatch, tiny_models, repo, commit, model, message
):
    _write(tmp_path, CHAIN.replace("hf://org/instruct", f"hf://{repo}"))
    _go_online(monkeypatch, cache, {"org/base": (B1, tiny_models["base"]),
                                    repo: (commit, tiny_models[model])})
    downloads = _remote_repo(monkeypatch, cache, repo, commit, tiny_models[model], tmp_path)
    with pytest.raises(IncompatibleModelsError) as caught:
        _project(tmp_path).make()
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert downloads == ["config.json"]
    assert calls.fetch == [] and calls.snapshot_download == []
    assert not (cache.repo_dir(repo) / "snapshots" / commit / "model.safetensors").exists()


def test_incompatible_local_parent_is_checked_from_headers(cache, calls, tmp_path, tiny_models):
    local = tmp_path / "wide"
    local.mkdir()
    for name, data in tiny_models["wide"].items():
        (local / name).write_bytes(data)
    _write(tmp_path, CHAIN.replace('"hf://org/instruct"', str(local)))
    with pytest.raises(IncompatibleModelsError, match="'instruct' has 300"):
        _project(tmp_path).make()
    assert calls.fetch == []


# --------------------------------------------------------------------------- downloads


class Recorder(Reporter):
    def __init__(self):
        self.downloads: list[tuple[str, str, int, int]] = []

    def download(self, node, label, done, total):
        self.downloads.append((node, label, done, total))


def test_download_progress_goes_through_the_reporter(cache, tmp_path, monkeypatch, tiny_models):
    _write(tmp_path, CHAIN.replace("hf://org/instruct", "hf://org/fresh"))
    files = tiny_models["instruct"]
    _go_online(monkeypatch, cache, {"org/base": (B1, tiny_models["base"]),
                                    "org/fresh": (NEW, files)})
    _remote_repo(monkeypatch, cache, "org/fresh", NEW, files, tmp_path)

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None,
                          tqdm_class=None, **kw):
        wanted = {p: files[p] for p in allow_patterns}
        bar = tqdm_class(desc="Downloading", total=sum(map(len, wanted.values())), unit="B")
        for data in wanted.values():
            bar.update(len(data))
        bar.close()
        return str(cache.add_commit(repo_id, revision, wanted))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    recorder = Recorder()
    result = _project(tmp_path).make(reporter=recorder)
    assert _outcomes(result) == {"tuned": "built"}
    total = sum(len(files[f.path]) for f in
                _project(tmp_path).plan()[1].source.extra["resolution"].files)
    assert recorder.downloads[-1] == ("instruct", "org/fresh: Downloading", total, total)

    from io import StringIO

    from mergebuild.report import PlainReporter

    out = StringIO()
    PlainReporter(out=out).download("instruct", "org/fresh: Downloading", total, total)
    assert out.getvalue().startswith("downloading org/fresh: Downloading for instruct: ")


# --------------------------------------------------------------------------- secrets


def test_token_never_reaches_provenance_card_lock_or_logs(cache, tmp_path, monkeypatch,
                                                          tiny_models):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _write(tmp_path, CHAIN)
    outputs = [_cli(tmp_path, "plan"), _cli(tmp_path, "plan", "--json"), _cli(tmp_path, "make")]
    _go_online(monkeypatch, cache, {"org/base": (B1, tiny_models["base"]),
                                    "org/instruct": (I2, tiny_models["instruct2"])})
    outputs += [_cli(tmp_path, "make"), _cli(tmp_path, "make", "--frozen")]
    assert all(o.exit_code == 0 for o in outputs), [o.output for o in outputs]
    texts = [o.output + o.stderr for o in outputs]
    texts.append((tmp_path / "Mergefile.lock").read_text())
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ""):
            texts.append(path.read_text(errors="replace"))
    assert any("provenance" in t or "base_model" in t for t in texts)
    assert not [t for t in texts if TOKEN in t or "hf_secret" in t]
