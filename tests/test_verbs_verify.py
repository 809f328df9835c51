"""`lineage`, `verify` and `make --check` on real builds, through the CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergebuild.cli import main

# Three deterministic methods in a chain; shards small enough that the weights are split.
DETERMINISTIC = """\
version: 1
defaults:
  dtype: bfloat16
  max_shard_size: 60000
models:
  base:     {{source: {models}/base}}
  instruct: {{source: {models}/instruct}}
  code:     {{source: {models}/code}}
  lin:
    merge_method: linear
    models:
      - {{model: instruct, parameters: {{weight: 0.6}}}}
      - {{model: code, parameters: {{weight: 0.4}}}}
  ti:
    merge_method: ties
    base_model: base
    models:
      - {{model: instruct, parameters: {{weight: 0.5, density: 0.5}}}}
      - {{model: lin, parameters: {{weight: 0.5, density: 0.7}}}}
  dare:
    merge_method: dare_ties
    base_model: base
    models:
      - {{model: ti, parameters: {{weight: 0.5, density: 0.5}}}}
      - {{model: code, parameters: {{weight: 0.5, density: 0.5}}}}
"""


def run(ws, *args):
    return CliRunner().invoke(main, ["-f", str(ws.mergefile), "--cache-dir", str(ws.cache),
                                     *args], obj={})


def built(ws, text: str, *targets: str) -> dict[str, Path]:
    ws.write(text)
    project = ws.project()
    project.make(list(targets))
    return {t: project.path(t) for t in targets}


def writable(path: Path) -> Path:
    """Store objects are read-only: open one file (and its directory) for tampering."""
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o644)
    return path


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(writable(path).read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("model-*.safetensors"))


@pytest.fixture
def chain(workspace):
    from conftest import CHAIN

    return built(workspace, CHAIN, "final-model")["final-model"]


@pytest.fixture
def sharded(workspace):
    return built(workspace, DETERMINISTIC, "dare")["dare"]


# --------------------------------------------------------------------------- lineage


def test_card_of_a_three_stage_chain_lists_every_stage(chain):
    from huggingface_hub import ModelCard

    card = ModelCard.load(chain / "README.md")
    assert card.data.library_name == "transformers"
    assert {"merge", "mergebuild", "ties", "slerp", "task_arithmetic"} <= set(card.data.tags)
    for stage in ("base-instruct", "chat-code", "final-model"):
        assert stage in card.text, stage
    for source in ("base", "instruct", "chat", "code", "math"):
        assert f"`{source}`" in card.text or f" {source} " in card.text, source


def test_lineage_of_a_node_shows_every_stage_and_source(workspace, chain):
    result = run(workspace, "lineage", "final-model")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("final-model ties ")
    for stage, method in (("base-instruct", "task_arithmetic"), ("chat-code", "slerp")):
        assert any(f"{stage} {method} " in line for line in lines), stage
    assert "t=0.4" in result.output and "math.density=0.5" in result.output
    for source in ("base", "instruct", "chat", "code", "math"):
        assert any(f") {source} local " in line for line in lines), source


def test_lineage_from_a_copied_directory_needs_no_mergefile(workspace, chain, tmp_path,
                                                            monkeypatch):
    released = tmp_path / "elsewhere" / "released"
    shutil.copytree(chain, released)
    monkeypatch.chdir(released.parent)
    assert not Path("Mergefile").exists()
    result = CliRunner().invoke(main, ["lineage", "--json", str(released)], obj={})
    assert result.exit_code == 0, result.output
    tree = json.loads(result.output)
    assert (tree["name"], tree["method"]) == ("final-model", "ties")
    assert [p["name"] for p in tree["parents"]] == ["base", "base-instruct", "chat-code", "math"]
    chat_code = tree["parents"][2]
    assert (chat_code["method"], chat_code["params"]["t"]) == ("slerp", 0.4)
    assert [p["name"] for p in chat_code["parents"]] == ["chat", "code"]
    assert all(p["digest"] for p in chat_code["parents"])
    verified = CliRunner().invoke(main, ["verify", str(released)], obj={})
    assert verified.exit_code == 0, verified.output
    assert verified.output == "verified 7 files, chain of 3 stages\n"


def test_lineage_of_an_unknown_name_without_mergefile_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["lineage", "final-model"], obj={})
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "'final-model' is not a directory, and there is no Mergefile" in result.output


def test_lineage_of_an_unbuilt_node_says_to_make_it(workspace):
    from conftest import CHAIN

    workspace.write(CHAIN)
    result = run(workspace, "lineage", "chat-code")
    assert result.exit_code == 4
    assert "node 'chat-code': not built (new node)" in result.output


# --------------------------------------------------------------------------- verify


def test_verify_a_node_counts_files_and_stages(workspace, sharded):
    assert len(shards(sharded)) >= 3
    result = run(workspace, "verify", "dare")
    assert result.exit_code == 0, result.output
    files = len([p for p in sharded.iterdir() if p.name != "provenance.json"])
    assert result.output == f"verified {files} files, chain of 3 stages\n"


@pytest.mark.parametrize("tamper, kind", [
    (lambda d: flip_byte(shards(d)[0]), "modified"),
    (lambda d: os.truncate(writable(shards(d)[1]), 1000), "truncated"),
    (lambda d: (writable(d / "config.json")).unlink(), "missing"),
])
def test_verify_catches_tampering_in_the_store(workspace, sharded, tamper, kind):
    tamper(sharded)
    result = run(workspace, "verify", "dare")
    assert result.exit_code == 1
    problems = [line for line in result.output.splitlines() if not line.startswith("mergebuild")]
    assert len(problems) == 1, result.output
    assert problems[0].split(": ")[1] == kind
    assert "1 problem" in result.output


def test_verify_prints_every_problem_one_per_line(workspace, sharded, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sharded, copy)
    flip_byte(shards(copy)[0])
    os.truncate(shards(copy)[1], 10)
    (copy / "tokenizer.json").unlink()
    result = CliRunner().invoke(main, ["verify", str(copy)], obj={})
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert [line.split(": ")[:2] for line in lines[:3]] == [
        [shards(copy)[0].name, "modified"], [shards(copy)[1].name, "truncated"],
        ["tokenizer.json", "missing"]]
    assert lines[3] == f"mergebuild: error: {copy}: 3 problems"


# --------------------------------------------------------------------------- make --check


def test_check_reproduces_deterministic_methods_bit_for_bit(workspace, sharded):
    objects = sorted(p.name for p in (workspace.cache / "objects").glob("*/*"))
    result = run(workspace, "make", "--check", "lin", "ti", "dare")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split(":")[0] for line in lines] == ["lin", "ti", "dare"]
    assert all(": reproduced bit for bit (" in line for line in lines)
    # nothing published, no scratch left behind
    assert sorted(p.name for p in (workspace.cache / "objects").glob("*/*")) == objects
    assert not any((workspace.cache / "scratch").glob("*"))
    assert run(workspace, "verify", "dare").exit_code == 0


def test_check_reports_a_stored_file_that_was_altered(workspace, sharded):
    altered = shards(sharded)[0]
    flip_byte(altered)
    result = run(workspace, "make", "--check", "dare")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith(f"dare: {altered.name}: sha256 ")
    assert lines[-1] == f"dare: NOT reproduced (1 of {len(list(sharded.iterdir())) - 1} files differ)"


def test_check_of_an_unbuilt_node_says_to_make_it_first(workspace):
    workspace.write(DETERMINISTIC)
    result = run(workspace, "make", "--check", "lin")
    assert result.exit_code == 4
    assert "node 'lin': not built (new node) (run 'mergebuild make lin' first)" in result.output
    assert not (workspace.cache / "objects").exists()


def test_the_python_api_verifies_and_checks(workspace, sharded):
    project = workspace.project()
    report = project.verify("dare")
    assert (report.ok, report.stages, report.directory) == (True, 3, sharded)
    check = project.check("ti")
    assert check.ok and check.stored_digest == check.rebuilt_digest
    assert check.files == len(list(project.path("ti").iterdir())) - 1
