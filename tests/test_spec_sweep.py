"""Sweeps in the Mergefile: grid expansion, variant names, paths, select, children."""

from __future__ import annotations

import pytest

from mergebuild.errors import MergefileError
from mergebuild.spec.model import MergeSpec, SelectSpec, SweepSpec
from mergebuild.spec.sweep import grid_points, variant_name

SWEPT = """\
version: 1
evals:
  code-skill: {{kind: accuracy, data: "demo://code.jsonl", max_new_tokens: 8}}
  fluency: {{kind: perplexity, data: "demo://text.txt", window: 128, stride: 64}}
models:
  chat: {{source: {models}/chat}}
  code: {{source: {models}/code}}
  blend:
    merge_method: task_arithmetic
    base_model: chat
    models: [{{model: code, parameters: {{weight: 0.7}}}}]
    parameters: {{lambda: 1.0}}
    sweep:
      lambda: [0.35, 1.0]
      models.code.weight: [0.5, 1.0, 0.5]
{extra}
"""


def load(workspace, extra: str = ""):
    from mergebuild.spec.parse import load_mergefile

    workspace.write(SWEPT.replace("{extra}", extra.replace("{", "{{").replace("}", "}}")))
    return load_mergefile(workspace.mergefile)


def test_grid_is_every_combination_first_path_slowest():
    assert grid_points({"t": [1, 2], "models.a.weight": [3, 4]}, "f", 1, "n") == [
        {"t": 1, "models.a.weight": 3}, {"t": 1, "models.a.weight": 4},
        {"t": 2, "models.a.weight": 3}, {"t": 2, "models.a.weight": 4}]


def test_variant_names_are_readable():
    assert variant_name("blend", {"t": 0.35, "models.code.weight": 1.0}) == \
        "blend[t=0.35,code.weight=1.0]"
    assert variant_name("b", {"parameters.normalize": False}) == "b[normalize=false]"


def test_sweep_expands_into_variant_merge_nodes(workspace):
    mf = load(workspace)
    sweep = mf.nodes["blend"]
    assert isinstance(sweep, SweepSpec)
    # The repeated 0.5 is one variant: 2 × 2, not 2 × 3.
    assert sweep.variants == ("blend[lambda=0.35,code.weight=0.5]",
                              "blend[lambda=0.35,code.weight=1.0]",
                              "blend[lambda=1.0,code.weight=0.5]",
                              "blend[lambda=1.0,code.weight=1.0]")
    variant = mf.nodes["blend[lambda=0.35,code.weight=1.0]"]
    assert isinstance(variant, MergeSpec)
    assert variant.parameters["lambda"] == 0.35
    assert dict(variant.models[0].parameters) == {"weight": 1.0}
    assert variant.parent_refs() == ["chat", "code"]
    assert sweep.select is None


def test_select_is_parsed_and_children_need_it(workspace):
    child = """\
  final:
    merge_method: linear
    models: [{model: blend, parameters: {weight: 1.0}}]
"""
    with pytest.raises(MergefileError, match="sweep of 4 variants") as info:
        load(workspace, child)
    assert "select" in info.value.hint
    mf = load(workspace, "    select: {maximize: code-skill}\n" + child)
    assert mf.nodes["blend"].select == SelectSpec(goal="maximize", metric="code-skill")
    assert mf.nodes["final"].parent_refs() == ["blend"]


@pytest.mark.parametrize("extra, message", [
    ("    select: {best: x}\n", "'select' must be"),
    ("    select: {maximize: code-skil}\n", "unknown eval 'code-skil'"),
    ("    select: {minimize: retention}\n", "can only maximize retention"),
    ("    select: {maximize: retention}\n", "no ancestor declares evals"),
    ("    select: {maximize: code-skill.acc}\n", "gives no metric 'acc'"),
    ("    select: {maximize: code-skill.n}\n", "is a count, not a score"),
])
def test_bad_select(workspace, extra, message):
    with pytest.raises(MergefileError, match=message) as info:
        load(workspace, extra)
    if "code-skil}" in extra:
        assert info.value.hint == "did you mean 'code-skill'?"


def test_select_names_an_eval_or_one_of_its_metrics(workspace):
    mf = load(workspace, "    select: {minimize: fluency.perplexity}\n")
    assert mf.nodes["blend"].select == SelectSpec(goal="minimize", metric="fluency.perplexity")


def test_bad_sweep_paths_name_the_problem(workspace):
    workspace.write(SWEPT.replace("models.code.weight", "models.math.weight")
                    .replace("{extra}", ""))
    from mergebuild.spec.parse import load_mergefile

    with pytest.raises(MergefileError, match="names no model of this merge"):
        load_mergefile(workspace.mergefile)
    workspace.write(SWEPT.replace("lambda: [0.35, 1.0]", "lambda: []").replace("{extra}", ""))
    with pytest.raises(MergefileError, match="non-empty list"):
        load_mergefile(workspace.mergefile)
    workspace.write(SWEPT.replace("lambda: [0.35, 1.0]", "lamda: [0.35]").replace("{extra}", ""))
    with pytest.raises(MergefileError, match="lamda"):
        load_mergefile(workspace.mergefile)


def test_select_without_sweep_is_refused(workspace):
    workspace.write(SWEPT.replace("    sweep:\n      lambda: [0.35, 1.0]\n"
                                  "      models.code.weight: [0.5, 1.0, 0.5]\n",
                                  "    select: {{maximize: x}}\n").replace("{extra}", ""))
    from mergebuild.spec.parse import load_mergefile

    with pytest.raises(MergefileError, match="has no 'sweep'"):
        load_mergefile(workspace.mergefile)


def test_the_graph_tree_names_each_variant(workspace):
    from rich.console import Console

    from mergebuild.spec.graph import build_graph, render_tree

    console = Console(width=200, record=True)
    console.print(render_tree(build_graph(load(workspace))))
    text = console.export_text()
    assert "blend (sweep of 4 variants)" in text
    assert "blend[lambda=0.35,code.weight=0.5] (task_arithmetic)" in text
