"""Selection of a sweep's variant: the objective (an eval's score, or retention), the ranking
with its tie-breaking, and the line saying why."""

from __future__ import annotations

import pytest

from mergebuild.errors import MergefileError
from mergebuild.plan.evaluations import required_evals
from mergebuild.plan.selection import choose, objective, rank, retention_range, swept_label
from mergebuild.spec.graph import build_graph
from mergebuild.spec.model import SelectSpec
from mergebuild.spec.parse import load_mergefile

SELECTED = """\
version: 1
evals:
  chat-skill: {{kind: accuracy, data: "demo://chat.jsonl", max_new_tokens: 8}}
  code-skill: {{kind: accuracy, data: "demo://code.jsonl", max_new_tokens: 8}}
  fluency: {{kind: perplexity, data: "demo://text.txt", window: 128, stride: 64}}
  both: {{kind: command, command: "true", lower_is_better: [loss]}}
models:
  chat: {{source: "demo://chat", evals: [chat-skill, fluency]}}
  code: {{source: "demo://code", evals: [code-skill]}}
  blend:
    merge_method: slerp
    base_model: chat
    models: [{{model: chat}}, {{model: code}}]
    parameters: {{t: 0.5}}
    sweep:
      t: [0.2, 0.5, 0.8]
    select: {{{goal}: {metric}}}
"""
VARIANTS = ["blend[t=0.2]", "blend[t=0.5]", "blend[t=0.8]"]


def parsed(workspace, goal: str = "maximize", metric: str = "code-skill"):
    workspace.write(SELECTED.replace("{goal}", goal).replace("{metric}", metric))
    mergefile = load_mergefile(workspace.mergefile)
    return mergefile, build_graph(mergefile)


def table(scores: dict[str, dict[str, dict[str, float]]]):
    return lambda node: scores.get(node, {})


def test_objective_reads_the_eval_s_one_score(workspace):
    mf, graph = parsed(workspace)
    scores = table({"blend[t=0.5]": {"code-skill": {"accuracy": 0.75, "n": 40.0}}})
    select = mf.nodes["blend"].select
    assert objective(mf, graph, select, "blend[t=0.5]", scores) == 0.75
    assert objective(mf, graph, select, "blend[t=0.2]", scores) is None  # not scored yet


def test_objective_of_a_named_metric_and_several_scores(workspace):
    mf, graph = parsed(workspace, "minimize", "both.loss")
    scores = table({"blend[t=0.2]": {"both": {"loss": 1.5, "acc": 0.3}}})
    assert objective(mf, graph, mf.nodes["blend"].select, "blend[t=0.2]", scores) == 1.5
    with pytest.raises(MergefileError, match="gives 2 scores") as info:
        objective(mf, graph, SelectSpec("maximize", "both"), "blend[t=0.2]", scores)
    assert "both.loss" in info.value.hint


def test_variants_need_the_evals_the_selection_reads(workspace):
    mf, graph = parsed(workspace)
    assert required_evals(mf, graph, "blend[t=0.2]") == ("code-skill",)
    assert required_evals(mf, graph, "chat") == ("chat-skill", "fluency")
    mf, graph = parsed(workspace, metric="retention")
    assert required_evals(mf, graph, "blend[t=0.8]") == ("chat-skill", "fluency",
                                                         "code-skill")


def test_retention_is_the_mean_share_inverted_for_lower_is_better(workspace):
    mf, graph = parsed(workspace, metric="retention")
    parents = {"chat": {"chat-skill": {"accuracy": 0.8}, "fluency": {"perplexity": 10.0}},
               "code": {"code-skill": {"accuracy": 0.5}}}
    variant = {"chat-skill": {"accuracy": 0.4}, "fluency": {"perplexity": 20.0},
               "code-skill": {"accuracy": 0.5}}
    scores = table({**parents, "blend[t=0.5]": variant})
    shares = [0.4 / 0.8, 10.0 / 20.0, 0.5 / 0.5]
    assert retention_range(mf, graph, "blend[t=0.5]", scores) == pytest.approx(
        (sum(shares) / 3, 0.5))
    assert objective(mf, graph, mf.nodes["blend"].select, "blend[t=0.5]",
                     scores) == pytest.approx(sum(shares) / 3)
    # One unknown score (a parent not evaluated yet): no value, rather than a partial mean.
    del parents["code"]
    assert retention_range(mf, graph, "blend[t=0.5]", table({**parents,
                                                             "blend[t=0.5]": variant})) is None


def test_rank_orders_by_goal_and_breaks_ties_in_grid_order():
    values = {"a": 0.5, "b": 0.7, "c": 0.7, "d": None}
    best_first = rank(SelectSpec("maximize", "x"), ["a", "b", "c", "d"], values)
    assert [(r.variant, r.place) for r in best_first] == [("b", 1), ("c", 2), ("a", 3),
                                                          ("d", 4)]
    lowest_first = rank(SelectSpec("minimize", "x"), ["d", "c", "b", "a"], values)
    assert [r.variant for r in lowest_first] == ["a", "c", "b", "d"]


def test_choose_says_which_and_why(workspace):
    mf, graph = parsed(workspace)
    accuracies = {"blend[t=0.2]": 0.6, "blend[t=0.5]": 0.74, "blend[t=0.8]": 0.71}
    scores = table({v: {"code-skill": {"accuracy": a, "n": 40.0}}
                    for v, a in accuracies.items()})
    selection = choose(mf, graph, "blend", scores)
    assert selection.winner == max(accuracies, key=accuracies.__getitem__)
    assert selection.why() == "t=0.5: code-skill accuracy 0.74, best of 3 (next 0.71)"
    assert selection.headline() == ("blend → blend[t=0.5] (maximize code-skill: 0.74, "
                                    "best of 3)")
    recorded = selection.as_json()
    assert [row["variant"] for row in recorded["ranking"]] == ["blend[t=0.5]", "blend[t=0.8]",
                                                               "blend[t=0.2]"]
    assert recorded["selected"] == "blend[t=0.5]"


def test_a_tie_is_said_to_be_one(workspace):
    mf, graph = parsed(workspace)
    scores = table({v: {"code-skill": {"accuracy": 0.5}} for v in VARIANTS})
    selection = choose(mf, graph, "blend", scores)
    assert selection.winner == VARIANTS[0]
    assert selection.why() == ("t=0.2: code-skill accuracy 0.5, best of 3 "
                               "(tied with t=0.5; first in grid order)")


def test_retention_selection_reports_the_worst_share_too(workspace):
    mf, graph = parsed(workspace, metric="retention")
    parents = {"chat": {"chat-skill": {"accuracy": 1.0}, "fluency": {"perplexity": 10.0}},
               "code": {"code-skill": {"accuracy": 1.0}}}
    kept = {"blend[t=0.2]": (0.9, 0.3), "blend[t=0.5]": (0.6, 0.6), "blend[t=0.8]": (0.3, 0.9)}
    scores = table({**parents, **{
        v: {"chat-skill": {"accuracy": chat}, "fluency": {"perplexity": 10.0},
            "code-skill": {"accuracy": code}} for v, (chat, code) in kept.items()}})
    selection = choose(mf, graph, "blend", scores)
    means = {v: (chat + 1.0 + code) / 3 for v, (chat, code) in kept.items()}
    # Equal means: grid order decides, and the worst share is reported beside the mean.
    assert selection.winner == "blend[t=0.2]"
    assert selection.value == pytest.approx(means["blend[t=0.2]"])
    assert selection.worst["blend[t=0.5]"] == pytest.approx(0.6)
    assert selection.why() == ("t=0.2: retention (mean) 0.7333 (min 0.3), best of 3 "
                               "(tied with t=0.5; first in grid order)")


def test_swept_label():
    assert swept_label("blend[t=0.35,code.weight=1.0]") == "t=0.35,code.weight=1.0"
    assert swept_label("plain") == "plain"


def test_below_a_sweep_the_sweep_is_the_ancestor_not_its_variants(workspace):
    from mergebuild.plan.evaluations import retained_ancestors, retention

    text = SELECTED.replace("{goal}", "maximize").replace("{metric}", "code-skill").replace(
        "      t: [0.2, 0.5, 0.8]\n", "      t: [0.2, 0.5, 0.8]\n    evals: [code-skill]\n")
    workspace.write(text + """\
  final:
    merge_method: linear
    models: [{{model: blend, parameters: {{weight: 1.0}}}}]
    checks: {{retain: 0.9}}
""")
    mf = load_mergefile(workspace.mergefile)
    graph = build_graph(mf)
    assert retained_ancestors(mf, graph, "final") == ["chat", "code", "blend"]
    # The sweep's scores are its selected variant's: what a scores() of the plan gives it.
    scores = table({"blend": {"code-skill": {"accuracy": 0.5}},
                    "code": {"code-skill": {"accuracy": 1.0}},
                    "final": {"code-skill": {"accuracy": 0.45}}})
    rows = {(r.ancestor, r.eval): r.ratio for r in retention(mf, graph, "final", scores)}
    assert rows[("blend", "code-skill")] == pytest.approx(0.9)
    assert rows[("code", "code-skill")] == pytest.approx(0.45)
