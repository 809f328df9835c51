"""`mergebuild inspect`: nodes resolved to directories through the Project, a merge node's
parents inspected automatically, table, --json and --plot through the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import CHAIN

from mergebuild.cli import main
from mergebuild.verbs.inspect import inspect_models


def run(ws, *args):
    return CliRunner().invoke(main, ["-f", str(ws.mergefile), "--cache-dir", str(ws.cache),
                                     *args], obj={})


@pytest.fixture
def chain(workspace):
    workspace.write(CHAIN + """\
  blend:
    merge_method: linear
    models: [{{model: chat}}, {{model: code}}]
    parameters: {{weight: 0.5}}
""")
    assert run(workspace, "make", "base-instruct", "chat-code").exit_code == 0
    return workspace


def test_one_merge_node_inspects_its_parents_against_its_base(chain):
    result = run(chain, "inspect", "base-instruct", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["base"] == "base"
    assert list(report["models"]) == ["instruct"]
    assert list(report["merged"]) == ["base-instruct"]
    (survival,) = report["summary"]["total"]["survival"]
    # task_arithmetic with weight 1.0 adds all of τ: the projection is 1 up to bf16 rounding.
    assert survival["merged"] == "base-instruct" and survival["parent"] == "instruct"
    assert survival["projection"] == pytest.approx(1.0, abs=5e-3)
    assert survival["cosine"] == pytest.approx(1.0, abs=5e-3)


def test_nodes_against_a_base_match_the_library_call(chain):
    result = run(chain, "inspect", "chat", "code", "--base", "base", "--merged", "chat-code",
                 "--density", "0.3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    project = chain.project()
    direct = inspect_models({"chat": project.path("chat"), "code": project.path("code")},
                            project.path("base"), merged={"chat-code": project.path("chat-code")},
                            density=0.3)
    want = direct.to_json()
    assert report["density"] == 0.3
    assert report["groups"] == want["groups"]
    (pair,) = report["summary"]["total"]["pairs"]
    assert 0 <= pair["conflict_rate"] <= 1 and -1 <= pair["cosine"] <= 1


def test_a_source_not_yet_generated_is_materialised(chain):
    result = run(chain, "inspect", "math", "--base", "base", "--json")
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)["models"]) == ["math"]


def test_table_and_plots(chain, tmp_path):
    png, svg = tmp_path / "layers.png", tmp_path / "layers.svg"
    result = run(chain, "inspect", "chat-code", "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert "Task vectors vs base (chat)" in result.output
    assert "chat-code ← code" in result.output
    assert result.output.rstrip().endswith(f"plot: {png}")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run(chain, "inspect", "chat-code", "--plot", str(svg), "--json").exit_code == 0
    assert b"<svg" in svg.read_bytes()[:400]


def test_without_a_base_is_a_one_line_error(chain):
    result = run(chain, "inspect", "chat", "code")
    assert result.exit_code == 1
    assert result.output == ("mergebuild: error: inspect needs a base to take task vectors "
                             "against (pass --base NODE, or one merge node with a base_model)\n")
    result = run(chain, "inspect", "blend")
    assert result.exit_code == 2
    assert "node 'blend': has no base_model to take task vectors against" in result.output
    unbuilt = run(chain, "inspect", "final-model")
    assert unbuilt.exit_code == 4 and "not built" in unbuilt.output
