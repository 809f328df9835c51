"""Tests for mergebuild.provenance.statement: statements that satisfy in-toto v1 and SLSA v1."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from datetime import datetime
from pathlib import Path

import pytest
import xxhash

from mergebuild.errors import StoreError
from mergebuild.provenance.statement import (
    BuildRecord,
    ParentRef,
    build_statement,
    digest_set,
    dir_hash,
    read_statement,
)
from mergebuild.provenance.write import write_provenance
from mergebuild.provenance.secrets import scrub_secrets, scrub_text

# --------------------------------------------------------------------------- chain fixture
#   hub base-org/base-7b ─┐
#   hub code-org/coder-7b ─┼─ ties ─▶ A ─┐
#   local /models/chat ───┘              ├─ slerp ─▶ B ─┐
#   hub code-org/coder-7b ───────────────┘              ├─ linear ─▶ final
#   hub math-org/math-7b ───────────────────────────────┘

HEX = "0123456789abcdef"


def fake_hex(seed: str, length: int = 64) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:length]


HUB_BASE = ParentRef(
    name="base",
    role="base",
    kind="hub",
    uri="hf://base-org/base-7b",
    digest="sha256:" + fake_hex("base"),
    revision="main",
    commit=fake_hex("base-commit", 40),
    files={
        "model.safetensors": "sha256:" + fake_hex("base-file"),
        "config.json": "sha256:" + fake_hex("base-cfg"),
    },
)
HUB_CODER = ParentRef(
    name="coder",
    role="model",
    kind="hub",
    uri="hf://code-org/coder-7b",
    digest="xxh128:" + fake_hex("coder", 32),
    revision="v1.0",
    commit=fake_hex("coder-commit", 40),
    files={"model.safetensors": "xxh128:" + fake_hex("coder-file", 32)},
)
LOCAL_CHAT = ParentRef(
    name="chat",
    role="model",
    kind="local",
    uri="file:///models/chat",
    digest="sha256:" + fake_hex("chat"),
)
HUB_MATH = ParentRef(
    name="math",
    role="model",
    kind="hub",
    uri="hf://math-org/math-7b",
    digest="sha256:" + fake_hex("math"),
    revision="main",
    commit=fake_hex("math-commit", 40),
)

BUILDER = {"mergebuild": "0.1.0", "torch": "2.4.0", "safetensors": "0.4.5", "python": "3.11.9"}

EXCERPT = """\
base:
  source: {repo: base-org/base-7b, revision: main}
coder:
  source: {repo: code-org/coder-7b, revision: v1.0}
A:
  method: ties
  base_model: base
  models:
    - {model: coder, parameters: {weight: 0.6, density: 0.5}}
    - {model: chat, parameters: {weight: 0.4, density: 0.5}}
"""


def node_ref(name: str, role: str, stage: dict) -> ParentRef:
    """A parent that is another mergebuild node, its statement embedded."""
    record = stage["record"]
    return ParentRef(
        name=name,
        role=role,
        kind="node",
        uri=f"mergebuild:node/{name}",
        digest=record.digest,
        statement=stage["statement"],
        method=record.method,
    )


def build_stage(
    directory: Path, node: str, method: str, spec: dict, parents: tuple[ParentRef, ...], **extra
) -> dict:
    """Write fake outputs, a card and provenance for one node; return its record/statement."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": json.dumps({"model_type": "llama", "node": node}).encode(),
        "model.safetensors": hashlib.sha256(node.encode()).digest() * 64,
        "tokenizer.json": b'{"version": "1.0"}',
    }
    outputs = {}
    for name, data in files.items():
        (directory / name).write_bytes(data)
        outputs[name] = (hashlib.sha256(data).hexdigest(), len(data))
    recipe = {
        "method": method,
        "parameters": spec.get("parameters", {}),
        "parents": [p.digest for p in parents],
        "engine": "1",
    }
    fields = {
        "node": node,
        "key": xxhash.xxh3_128_hexdigest(json.dumps(recipe, sort_keys=True).encode()),
        "digest": "sha256:" + dir_hash({n: sha for n, (sha, _) in outputs.items()}),
        "method": method,
        "recipe": recipe,
        "spec": spec,
        "mergefile_digest": "sha256:" + fake_hex("Mergefile"),
        "mergefile_excerpt": EXCERPT,
        "parents": parents,
        "outputs": outputs,
        "builder": BUILDER,
        "device": "cpu",
        "engine_version": "1",
        "started": "2024-06-01T10:00:00Z",
        "finished": "2024-06-01T10:05:00Z",
        "invocation_id": f"inv-{node}",
        "rebuild_command": f"mergebuild -f Mergefile make {node}",
    }
    fields.update(extra)
    record = BuildRecord(**fields)
    write_provenance(directory, record)
    return {"dir": directory, "record": record, "statement": read_statement(directory)}


def build_chain(root: Path) -> dict[str, dict]:
    a = build_stage(
        root / "A",
        "A",
        "ties",
        {
            "method": "ties",
            "base_model": "base",
            "models": [
                {"model": "coder", "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": "chat", "parameters": {"weight": 0.4, "density": 0.5}},
            ],
            "parameters": {"normalize": True},
            "dtype": "bfloat16",
        },
        (HUB_BASE, HUB_CODER, LOCAL_CHAT),
    )
    b = build_stage(
        root / "B",
        "B",
        "slerp",
        {"method": "slerp", "base_model": "A", "models": ["A", "coder"], "parameters": {"t": 0.3}},
        (node_ref("A", "base", a), dataclasses.replace(HUB_CODER, role="model")),
    )
    final = build_stage(
        root / "final",
        "final",
        "linear",
        {
            "method": "linear",
            "description": "A general model with code and maths skills.",
            "models": [
                {"model": "B", "parameters": {"weight": 0.7}},
                {"model": "math", "parameters": {"weight": 0.3}},
            ],
            "tokenizer_source": "base",
        },
        (node_ref("B", "model", b), HUB_MATH),
    )
    return {"A": a, "B": b, "final": final}


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, dict]:
    return build_chain(tmp_path_factory.mktemp("chain"))


# --------------------------------------------------------------------------- validator

DIGEST_LENGTHS = {"sha256": (64,), "xxh128": (32,), "dirHash": (64,), "gitCommit": (40, 64)}


def check_digest_set(digest, where: str) -> None:
    assert isinstance(digest, dict) and digest, f"{where}: DigestSet must be a non-empty object"
    for algorithm, value in digest.items():
        assert algorithm in DIGEST_LENGTHS, f"{where}: unexpected algorithm {algorithm}"
        assert re.fullmatch(r"[0-9a-f]+", value), f"{where}: {algorithm} is not lowercase hex"
        assert len(value) in DIGEST_LENGTHS[algorithm], f"{where}: {algorithm} length {len(value)}"


def check_resource_descriptor(rd, where: str) -> None:
    assert isinstance(rd, dict), f"{where}: ResourceDescriptor must be an object"
    assert {"uri", "digest", "content"} & rd.keys(), f"{where}: needs uri, digest or content"
    if "digest" in rd:
        check_digest_set(rd["digest"], where)
    if "name" in rd:
        assert isinstance(rd["name"], str)
    if "uri" in rd:
        assert re.match(r"^[a-z][a-z0-9+.-]*:", rd["uri"]), f"{where}: uri has no scheme"
    if "annotations" in rd:
        assert isinstance(rd["annotations"], dict)


def check_timestamp(value: str, where: str) -> None:
    assert value.endswith("Z"), f"{where}: timestamps are UTC"
    datetime.fromisoformat(value)


def check_statement(statement: dict, where: str = "statement") -> None:
    """Required fields and formats of in-toto Statement v1 + SLSA Provenance v1."""
    json.dumps(statement)  # plain JSON all the way down
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = statement["subject"]
    assert isinstance(subjects, list) and subjects
    names = [s.get("name") for s in subjects]
    assert len(names) == len(set(names)), f"{where}: subject names must be unique"
    for subject in subjects:
        assert "digest" in subject, f"{where}: each subject MUST have a digest"
        check_resource_descriptor(subject, f"{where}.subject[{subject.get('name')}]")
    predicate = statement["predicate"]
    definition = predicate["buildDefinition"]
    assert re.match(r"^https://", definition["buildType"])
    assert isinstance(definition["externalParameters"], dict)
    assert isinstance(definition.get("internalParameters", {}), dict)
    for i, dep in enumerate(definition.get("resolvedDependencies", [])):
        check_resource_descriptor(dep, f"{where}.resolvedDependencies[{i}]")
        upstream = dep.get("annotations", {}).get("statement")
        if upstream is not None:
            check_statement(upstream, f"{where}/{dep['name']}")
    builder = predicate["runDetails"]["builder"]
    assert re.match(r"^https://", builder["id"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in builder["version"].items())
    metadata = predicate["runDetails"].get("metadata", {})
    assert isinstance(metadata.get("invocationId", ""), str)
    for field in ("startedOn", "finishedOn"):
        if field in metadata:
            check_timestamp(metadata[field], f"{where}.{field}")


# --------------------------------------------------------------------------- tests


def test_statement_satisfies_in_toto_v1_and_slsa_v1(chain):
    check_statement(chain["final"]["statement"])


def test_statement_built_in_memory_satisfies_the_specs(chain):
    check_statement(build_statement(chain["final"]["record"]))


def test_subjects_are_every_output_file_plus_card_and_directory(chain):
    stage = chain["final"]
    subjects = {s["name"]: s for s in stage["statement"]["subject"]}
    assert sorted(subjects) == [
        ".",
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    for name in ("README.md", "config.json", "model.safetensors", "tokenizer.json"):
        data = (stage["dir"] / name).read_bytes()
        assert subjects[name]["digest"] == {"sha256": hashlib.sha256(data).hexdigest()}
        assert subjects[name]["annotations"] == {"size": len(data)}


def test_directory_subject_carries_content_digest_and_dir_hash(chain):
    record = chain["final"]["record"]
    directory = next(s for s in chain["final"]["statement"]["subject"] if s["name"] == ".")
    assert directory["digest"]["sha256"] == record.digest.removeprefix("sha256:")
    assert directory["digest"]["dirHash"] == dir_hash(
        {n: sha for n, (sha, _) in record.outputs.items()}
    )
    assert directory["annotations"]["files"] == 3
    assert directory["annotations"]["size"] == sum(size for _, size in record.outputs.values())


def test_build_definition_holds_spec_key_and_engine_version(chain):
    record = chain["final"]["record"]
    definition = chain["final"]["statement"]["predicate"]["buildDefinition"]
    assert definition["buildType"] == "https://mergebuild.dev/buildtypes/merge/v1"
    assert definition["externalParameters"] == {
        "node": "final",
        "method": "linear",
        "spec": json.loads(json.dumps(record.spec)),
        "mergefile_digest": record.mergefile_digest,
    }
    internal = definition["internalParameters"]
    assert (internal["key"], internal["digest"], internal["engine_version"]) == (
        record.key,
        record.digest,
        "1",
    )
    assert internal["device"] == "cpu"


def test_run_details_hold_versions_and_times(chain):
    run = chain["final"]["statement"]["predicate"]["runDetails"]
    assert run["builder"]["version"] == BUILDER
    assert run["metadata"] == {
        "invocationId": "inv-final",
        "startedOn": "2024-06-01T10:00:00Z",
        "finishedOn": "2024-06-01T10:05:00Z",
    }


def test_timestamps_appear_only_in_run_metadata(chain):
    statement = chain["A"]["statement"]
    text = json.dumps({k: v for k, v in statement["predicate"].items() if k != "runDetails"})
    assert "2024-06-01" not in text


def test_hub_dependency_splits_digest_and_keeps_commit_revision_files(chain):
    deps = chain["A"]["statement"]["predicate"]["buildDefinition"]["resolvedDependencies"]
    coder = next(d for d in deps if d["name"] == "coder")
    assert coder["uri"] == "hf://code-org/coder-7b"
    assert coder["digest"] == {
        "xxh128": HUB_CODER.digest.removeprefix("xxh128:"),
        "gitCommit": HUB_CODER.commit,
    }
    assert coder["annotations"] == {
        "kind": "hub",
        "role": "model",
        "revision": "v1.0",
        "commit": HUB_CODER.commit,
        "files": dict(HUB_CODER.files),
    }


def test_local_dependency_has_path_uri_and_sha256(chain):
    deps = chain["A"]["statement"]["predicate"]["buildDefinition"]["resolvedDependencies"]
    chat = next(d for d in deps if d["name"] == "chat")
    assert chat == {
        "name": "chat",
        "uri": "file:///models/chat",
        "digest": {"sha256": LOCAL_CHAT.digest.removeprefix("sha256:")},
        "annotations": {"kind": "local", "role": "model"},
    }


def test_node_dependency_embeds_the_upstream_statement_chain(chain):
    deps = chain["final"]["statement"]["predicate"]["buildDefinition"]["resolvedDependencies"]
    b = next(d for d in deps if d["name"] == "B")
    assert b["annotations"]["method"] == "slerp"
    assert b["annotations"]["statement"] == chain["B"]["statement"]
    b_deps = b["annotations"]["statement"]["predicate"]["buildDefinition"]["resolvedDependencies"]
    a = next(d for d in b_deps if d["name"] == "A")
    assert a["annotations"]["statement"] == chain["A"]["statement"]
    assert a["digest"] == {"sha256": chain["A"]["record"].digest.removeprefix("sha256:")}


def test_same_record_writes_identical_bytes(chain, tmp_path):
    stage = chain["final"]
    for name in stage["record"].outputs:
        (tmp_path / name).write_bytes((stage["dir"] / name).read_bytes())
    write_provenance(tmp_path, stage["record"])
    for name in ("provenance.json", "README.md"):
        assert (tmp_path / name).read_bytes() == (stage["dir"] / name).read_bytes()


def test_write_leaves_no_temporary_files(chain):
    assert sorted(p.name for p in chain["final"]["dir"].iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "provenance.json",
        "tokenizer.json",
    ]


def test_parent_without_digest_is_described_by_uri(chain):
    parent = dataclasses.replace(LOCAL_CHAT, digest="")
    record = dataclasses.replace(chain["A"]["record"], parents=(parent,))
    (dep,) = build_statement(record)["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert "digest" not in dep and dep["uri"] == "file:///models/chat"
    check_statement(build_statement(record))


def test_digest_set_splits_prefixed_digests():
    assert digest_set("sha256:" + "a" * 64) == {"sha256": "a" * 64}
    assert digest_set("xxh128:ABCDEF") == {"xxh128": "abcdef"}
    with pytest.raises(ValueError, match="not of the form"):
        digest_set("deadbeef")


TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"


def test_tokens_are_scrubbed_from_statement_and_card(chain, tmp_path):
    record = dataclasses.replace(
        chain["A"]["record"],
        spec={
            "method": "ties",
            "hf_token": TOKEN,
            "tokenizer_source": "base",
            "description": f"built with {TOKEN}",
        },
        recipe={"method": "ties", "note": f"token={TOKEN}"},
        parents=(
            dataclasses.replace(
                HUB_BASE, uri=f"https://user:{TOKEN}@huggingface.co/base-org/base-7b"
            ),
        ),
        mergefile_excerpt=f"A:\n  method: ties\n  token: {TOKEN}\n  hub_token: secret123\n",
        rebuild_command=f"mergebuild make A --token {TOKEN}",
        outputs={},
    )
    write_provenance(tmp_path, record)
    for name in ("provenance.json", "README.md"):
        text = (tmp_path / name).read_text()
        assert TOKEN not in text, name
        assert "hf_AbCd" not in text, name
    statement = read_statement(tmp_path)
    spec = statement["predicate"]["buildDefinition"]["externalParameters"]["spec"]
    assert spec["hf_token"] == "[REDACTED]"
    assert spec["tokenizer_source"] == "base"
    assert "secret123" not in (tmp_path / "README.md").read_text()
    assert "--token [REDACTED]" in (tmp_path / "README.md").read_text()


def test_scrub_keeps_ordinary_values_and_hub_revisions():
    value = {
        "uri": "hf://gpt2@main",
        "tokenizer": {"source": "base"},
        "author": "someone",
        "use_auth_token": True,
        "list": ("a", 1, None),
        "git": "https://alice:pw@example.com/repo.git",
    }
    assert scrub_secrets(value) == {
        "uri": "hf://gpt2@main",
        "tokenizer": {"source": "base"},
        "author": "someone",
        "use_auth_token": True,
        "list": ["a", 1, None],
        "git": "https://[REDACTED]@example.com/repo.git",
    }


def test_scrub_text_covers_headers_query_tokens_and_the_environment_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value")
    text = (f"GET https://hub.example/x?revision=main&token={TOKEN} failed; "
            f"Authorization: Bearer {TOKEN}; retry with plain-secret-value")
    assert scrub_text(text) == (
        "GET https://hub.example/x?revision=main&token=[REDACTED] failed; "
        "Authorization: Bearer [REDACTED]; retry with [REDACTED]"
    )


def test_read_statement_missing_raises_one_line_store_error(tmp_path):
    with pytest.raises(StoreError, match="no provenance") as info:
        read_statement(tmp_path)
    assert "\n" not in str(info.value)


def test_read_statement_rejects_invalid_json(tmp_path):
    (tmp_path / "provenance.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        read_statement(tmp_path)


def test_read_statement_rejects_wrong_statement_type(chain, tmp_path):
    statement = dict(chain["A"]["statement"], _type="https://in-toto.io/Statement/v0.1")
    (tmp_path / "provenance.json").write_text(json.dumps(statement))
    with pytest.raises(StoreError, match="invalid provenance: _type"):
        read_statement(tmp_path)


def test_read_statement_rejects_malformed_digest(chain, tmp_path):
    statement = json.loads(json.dumps(chain["A"]["statement"]))
    statement["subject"][0]["digest"]["sha256"] = "XYZ"
    (tmp_path / "provenance.json").write_text(json.dumps(statement))
    with pytest.raises(StoreError, match="lowercase hex"):
        read_statement(tmp_path)
