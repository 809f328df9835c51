"""Tests for mergebuild.provenance.lineage: lineage and integrity from the artifacts alone."""

from __future__ import annotations

import json
import shutil

import pytest
from rich.console import Console
from test_provenance_statement import HUB_BASE, HUB_CODER, build_chain

from mergebuild.errors import StoreError
from mergebuild.provenance.integrity import Problem, quick_check, verify_directory
from mergebuild.provenance.lineage import (
    format_parameters,
    key_parameters,
    lineage_to_json,
    load_lineage,
    render_lineage_tree,
)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, dict]:
    return build_chain(tmp_path_factory.mktemp("chain"))


@pytest.fixture
def final_copy(chain, tmp_path):
    """The final model copied alone into a fresh directory: no Mergefile, no siblings."""
    target = tmp_path / "released"
    shutil.copytree(chain["final"]["dir"], target)
    return target


def kinds(problems: list[Problem]) -> list[tuple[str, str]]:
    return [(p.path, p.kind) for p in problems]


def test_lineage_from_a_copied_directory(chain, final_copy):
    assert not list(final_copy.parent.glob("Mergefile*"))
    final = load_lineage(final_copy)
    assert (final.name, final.kind, final.method) == ("final", "node", "linear")
    assert final.digest == chain["final"]["record"].digest
    assert final.key == chain["final"]["record"].key
    assert dict(final.params) == {"B.weight": 0.7, "math.weight": 0.3, "tokenizer_source": "base"}
    b, math = final.children
    assert (b.name, b.kind, b.method, b.role) == ("B", "node", "slerp", "model")
    assert (math.kind, math.revision, math.commit) == (
        "hub",
        "main",
        chain["final"]["record"].parents[1].commit,
    )
    a, coder = b.children
    assert (a.name, a.method, dict(a.params)["coder.weight"]) == ("A", "ties", 0.6)
    assert [c.name for c in a.children] == ["base", "coder", "chat"]
    base = a.children[0]
    assert (base.uri, base.revision, base.commit, base.digest) == (
        HUB_BASE.uri,
        "main",
        HUB_BASE.commit,
        HUB_BASE.digest,
    )
    assert coder.digest == HUB_CODER.digest


def test_lineage_json_round_trips(final_copy):
    data = json.loads(json.dumps(lineage_to_json(load_lineage(final_copy))))
    assert data["name"] == "final" and data["method"] == "linear"
    b = data["parents"][0]
    a = b["parents"][0]
    assert a["params"]["normalize"] is True
    base = a["parents"][0]
    assert base == {
        "name": "base",
        "kind": "hub",
        "role": "base",
        "uri": "hf://base-org/base-7b",
        "digest": HUB_BASE.digest,
        "repo": "base-org/base-7b",
        "revision": "main",
        "commit": HUB_BASE.commit,
        "parents": [],
    }


def test_rich_tree_shows_every_node(final_copy):
    console = Console(record=True, width=200, color_system=None)
    console.print(render_lineage_tree(load_lineage(final_copy)))
    text = console.export_text()
    for fragment in (
        "final linear",
        "B slerp t=0.3",
        "A ties",
        "base-org/base-7b@main",
        "chat local",
    ):
        assert fragment in text
    assert HUB_BASE.commit[:12] in text


def test_load_lineage_without_provenance_raises(tmp_path):
    with pytest.raises(StoreError, match="no provenance"):
        load_lineage(tmp_path)


def test_verify_passes_on_an_intact_copy(final_copy):
    assert verify_directory(final_copy) == []
    assert quick_check(final_copy) == []


def test_verify_catches_one_flipped_byte(final_copy):
    weights = final_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert kinds(verify_directory(final_copy)) == [("model.safetensors", "modified")]


def test_verify_catches_a_truncated_file(final_copy):
    weights = final_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    problems = verify_directory(final_copy)
    assert kinds(problems) == [("model.safetensors", "truncated")]
    assert "expected 2048" in problems[0].detail


def test_verify_catches_a_removed_file(final_copy):
    (final_copy / "tokenizer.json").unlink()
    assert kinds(verify_directory(final_copy)) == [("tokenizer.json", "missing")]


def test_verify_catches_an_unexpected_weights_file(final_copy):
    (final_copy / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 64)
    (final_copy / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert kinds(verify_directory(final_copy)) == [
        ("model-00002-of-00002.safetensors", "unexpected")
    ]


def test_verify_catches_an_edited_card(final_copy):
    card = final_copy / "README.md"
    card.write_text(card.read_text().replace("ties", "TIES"))
    assert kinds(verify_directory(final_copy)) == [("README.md", "modified")]


def test_verify_catches_a_broken_chain(final_copy):
    path = final_copy / "provenance.json"
    statement = json.loads(path.read_text())
    b = statement["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    a = b["annotations"]["statement"]["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    directory = next(s for s in a["annotations"]["statement"]["subject"] if s["name"] == ".")
    directory["digest"]["sha256"] = "0" * 64
    path.write_text(json.dumps(statement))
    problems = verify_directory(final_copy)
    assert ("provenance.json#final/B/A", "invalid-provenance") in kinds(problems)
    assert all(p.kind == "invalid-provenance" for p in problems)


def test_verify_catches_a_dependency_that_names_another_digest(final_copy):
    path = final_copy / "provenance.json"
    statement = json.loads(path.read_text())
    b = statement["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    b["digest"]["sha256"] = "f" * 64
    path.write_text(json.dumps(statement))
    assert kinds(verify_directory(final_copy)) == [
        ("provenance.json#final/B", "invalid-provenance")
    ]


def test_verify_reports_missing_and_corrupt_provenance(final_copy):
    path = final_copy / "provenance.json"
    path.write_text("{")
    assert kinds(verify_directory(final_copy)) == [("provenance.json", "invalid-provenance")]
    path.unlink()
    assert kinds(verify_directory(final_copy)) == [("provenance.json", "missing")]


def test_verify_refuses_subject_names_outside_the_directory(final_copy):
    path = final_copy / "provenance.json"
    statement = json.loads(path.read_text())
    statement["subject"][0]["name"] = "../escape.json"
    path.write_text(json.dumps(statement))
    assert ("../escape.json", "invalid-provenance") in kinds(verify_directory(final_copy))


def test_quick_check_catches_size_changes_without_reading(final_copy):
    weights = final_copy / "model.safetensors"
    with open(weights, "ab") as f:
        f.write(b"extra")
    assert kinds(quick_check(final_copy)) == [("model.safetensors", "modified")]
    weights.write_bytes(weights.read_bytes()[:10])
    assert kinds(quick_check(final_copy)) == [("model.safetensors", "truncated")]


def test_quick_check_does_not_rehash(final_copy):
    weights = final_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[0] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert quick_check(final_copy) == []
    assert kinds(verify_directory(final_copy)) == [("model.safetensors", "modified")]


def test_key_parameters_of_a_slices_spec():
    spec = {
        "merge_method": "passthrough",
        "parameters": {},
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 8], "parameters": {}}]},
            {"sources": [{"model": "b", "layer_range": [4, 12], "parameters": {}}]},
        ],
        "dtype": "bfloat16",
        "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}" * 3,
    }
    params = key_parameters(spec)
    assert list(params) == ["chat_template", "dtype", "slices"]
    assert params["slices"] == "a[0:8] + b[4:12]"
    shown = format_parameters(params)
    assert shown.startswith("chat_template={% for m in messages %}{{ m.content }}{…, dtype=")
