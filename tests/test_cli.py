"""The command line: plan/graph/path/methods, torch-free startup, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from mergebuild.cli import main


def run(ws, *args):
    return CliRunner().invoke(main, ["-f", str(ws.mergefile), "--cache-dir", str(ws.cache),
                                     *args], obj={})


def test_plan_lists_every_node_with_status(workspace):
    workspace.chain()
    result = run(workspace, "plan", "final-model")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[:-1]}
    assert "stale" in lines["final-model"] and "new node" in lines["final-model"]
    assert result.output.splitlines()[-1] == "3 to build"


def test_plan_json_and_dry_run_build_nothing(workspace):
    workspace.chain()
    data = json.loads(run(workspace, "plan", "--json", "final-model").output)
    assert {d["node"]: d["status"] for d in data}["chat-code"] == "stale"
    dry = run(workspace, "make", "--dry-run", "final-model")
    assert dry.exit_code == 0 and "3 to build" in dry.output
    assert not (workspace.cache / "objects").exists()


def test_plan_and_graph_do_not_import_torch(workspace):
    workspace.chain()
    code = (
        "import sys\n"
        "from mergebuild.cli import main\n"
        "for args in (['plan', 'final-model'], ['graph'], ['graph', '--dot'], ['--help']):\n"
        "    try:\n"
        f"        main(['-f', {str(workspace.mergefile)!r}, '--cache-dir', "
        f"{str(workspace.cache)!r}, *args], obj={{}})\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_graph_formats(workspace):
    workspace.chain()
    tree = run(workspace, "graph")
    assert "final-model (ties)" in tree.output and "chat-code (slerp)" in tree.output
    dot = run(workspace, "graph", "--dot").output
    assert dot.startswith("digraph") and "n_chat_code -> n_final_model;" in dot
    mermaid = run(workspace, "graph", "--mermaid").output
    assert mermaid.startswith("graph LR") and "n_chat_code --> n_final_model" in mermaid


def test_make_prints_path_and_path_command_agrees(workspace):
    workspace.chain()
    made = run(workspace, "make", "final-model")
    assert made.exit_code == 0, made.output
    printed = made.output.strip().splitlines()[-1]
    assert printed.startswith("final-model: /")
    path = run(workspace, "path", "final-model")
    assert path.exit_code == 0
    assert path.output.strip() == printed.split(": ", 1)[1]
    again = run(workspace, "make", "final-model")
    assert "nothing to do" in again.output and "0 built" in again.output


def test_path_of_unbuilt_node_exits_non_zero_with_one_line(workspace):
    workspace.chain()
    result = run(workspace, "path", "chat-code")
    assert result.exit_code != 0
    assert result.output.count("\n") == 1
    assert "node 'chat-code': not built" in result.output


def test_unknown_target_is_one_line_with_suggestion(workspace):
    workspace.chain()
    result = run(workspace, "make", "final-modle")
    assert result.exit_code == 2
    assert result.output.strip().endswith("(did you mean 'final-model'?)")
    assert result.output.count("\n") == 1


def test_methods_lists_parameters():
    result = CliRunner().invoke(main, ["methods", "ties"], obj={})
    assert result.exit_code == 0
    assert result.output.startswith("ties  (needs base_model")
    assert "density" in result.output and "weight" in result.output
