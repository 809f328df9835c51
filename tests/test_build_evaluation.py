"""Evaluation in the DAG: make scores nodes, caches results, gates children; what the built
object records (model-index, attestation) and what eval/metrics/plan show."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest

from mergebuild import cli
from mergebuild.api import Project
from mergebuild.build import evaluation as build_evaluation
from mergebuild.errors import EvaluationError
from mergebuild.evaluate import loading
from mergebuild.provenance.attestation import TEST_RESULT_PREDICATE
from mergebuild.provenance.statement import EVALUATION_FILE
from mergebuild.sources.skills import SKILL_DATA

# Three stages over the skill family that carry math through unchanged (a linear merge of one
# model): s2 widens it to float32, s3 narrows it back to s1's very bytes. `lost` drops math;
# `after-lost` depends on it.
CHAIN = """\
version: 1
evals:
  math-skill: {{kind: accuracy, data: math.jsonl, max_new_tokens: 6}}
  code-skill: {{kind: accuracy, data: code.jsonl, max_new_tokens: 8}}
models:
  base: {{source: demo://base}}
  math: {{source: demo://math, evals: [math-skill]}}
  code: {{source: demo://code, evals: [code-skill]}}
  s1:
    merge_method: linear
    models: [{{model: math, parameters: {{weight: 1.0}}}}]
    evals: [math-skill]
  s2:
    merge_method: linear
    models: [{{model: s1, parameters: {{weight: 1.0}}}}]
    dtype: float32
  s3:
    merge_method: linear
    models: [{{model: s2, parameters: {{weight: 1.0}}}}]
    dtype: bfloat16
    checks:
      retain: {retain}
      math-skill: {{min: 0.5}}
  lost:
    merge_method: task_arithmetic
    base_model: base
    models: [{{model: s2, parameters: {{weight: 0.0}}}}]
    checks: {{retain: 0.9}}
  after-lost:
    merge_method: linear
    models: [{{model: lost, parameters: {{weight: 1.0}}}}]
"""


def _first_lines(source, target, count):
    target.write_text("\n".join(source.read_text().splitlines()[:count]) + "\n")


@pytest.fixture
def chain(tmp_path, monkeypatch):
    _first_lines(SKILL_DATA / "math.jsonl", tmp_path / "math.jsonl", 20)
    _first_lines(SKILL_DATA / "code.jsonl", tmp_path / "code.jsonl", 20)
    mergefile = tmp_path / "Mergefile"
    mergefile.write_text(CHAIN.format(retain=0.9))
    loads = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model",
                        lambda *a, **k: (loads.append(a[0]), real(*a, **k))[1])
    for module in ("accuracy", "perplexity", "harness"):
        monkeypatch.setattr(f"mergebuild.evaluate.{module}.load_model", loading.load_model)
    return tmp_path, loads


def _project(root):
    return Project(root / "Mergefile", root / "cache")


def _outcomes(result):
    return {r.name: r.outcome for r in result.results}


def test_make_scores_caches_and_a_noop_make_loads_no_model(chain):
    root, loads = chain
    first = _project(root).make(["s3"], device="cpu")
    assert _outcomes(first) == {"s1": "built", "s2": "built", "s3": "built"}
    # math and s1 on math-skill; s3 needs it too (it retains math and s1), but s3 has s1's
    # bytes, so s1's result serves it
    assert first.evaluations_run == 2 and len(loads) == 2
    s3 = next(r for r in first.results if r.name == "s3")
    assert [c.passed for c in s3.checks] == [True, True, True]
    assert {(c.rule, c.ancestor) for c in s3.checks} == {
        ("retain", "math"), ("retain", "s1"), ("min", None)}

    again = _project(root).make(["s3"], device="cpu")
    assert again.evaluations_run == 0 and len(loads) == 2
    assert again.ok


def test_retention_through_three_stages(chain):
    root, _ = chain
    project = _project(root)
    project.make(["s3"], device="cpu")
    metrics = project.metrics(["s3"])[0]
    rows = {(r.ancestor, r.eval): r for r in metrics.retention}
    assert set(rows) == {("math", "math-skill"), ("s1", "math-skill")}
    # a linear merge of one model is that model: everything is kept
    math = project.scores("math")["math-skill"]["accuracy"]
    assert math >= 0.8
    assert rows[("math", "math-skill")].value == math
    assert rows[("math", "math-skill")].ratio == 1.0


def test_editing_an_eval_reruns_only_it_and_plan_says_why(chain):
    root, loads = chain
    _project(root).make(["s3"], device="cpu")
    _first_lines(SKILL_DATA / "math.jsonl", root / "math.jsonl", 10)  # edit the data
    states = {s.name: s for s in _project(root).plan(["s3"])}
    pending = {(s, t.eval): t.reasons for s, state in states.items()
               for t in state.evaluations if t.status == "pending"}
    assert pending == {(n, "math-skill"): ("eval definition or data changed",)
                       for n in ("math", "s1", "s3")}
    result = _project(root).make(["s3"], device="cpu")
    assert result.evaluations_run == 2  # math and s1 (s3 has s1's bytes)
    assert _outcomes(result) == {"s1": "fresh", "s2": "fresh", "s3": "fresh"}


def test_rebuilt_to_identical_bytes_is_not_evaluated_again(chain):
    root, _ = chain
    _project(root).make(["s3"], device="cpu")
    result = _project(root).make(["s3"], force=True, device="cpu")
    assert _outcomes(result)["s3"] == "built"
    assert result.evaluations_run == 0


def test_failed_gate_fails_the_node_keeps_its_build_and_skips_children(chain, capsys):
    root, _ = chain
    code = cli.invoke(["-f", str(root / "Mergefile"), "--cache-dir", str(root / "cache"),
                       "make", "--device", "cpu", "after-lost"])
    err = capsys.readouterr().err
    assert code == 1
    failures = [line for line in err.splitlines() if line.startswith("check failed:")]
    assert len(failures) == 2  # math's and s1's math-skill, each in one line
    assert failures[0].startswith("check failed: lost: math-skill accuracy ")
    assert "< " in failures[0] and "(retain 90% of math's " in failures[0]
    assert "(retain 90% of s1's " in failures[1]
    project = _project(root)
    assert project.store.refs_of(project.mergefile.path).read("lost") is not None  # built and kept for inspection
    assert project.store.refs_of(project.mergefile.path).read("after-lost") is None  # never built


def test_keep_going_builds_other_branches(chain):
    root, _ = chain
    result = _project(root).make(["after-lost", "s3"], keep_going=True, device="cpu")
    outcomes = _outcomes(result)
    assert outcomes["lost"] == "failed" and outcomes["after-lost"] == "skipped"
    assert outcomes["s3"] == "built"
    assert not result.ok


def test_card_model_index_parses_into_eval_results(chain):
    from huggingface_hub import ModelCard

    root, _ = chain
    project = _project(root)
    project.make(["s3"], device="cpu")
    card = ModelCard.load(project.path("s3") / "README.md")
    accuracy = project.scores("s3")["math-skill"]["accuracy"]
    [result] = card.data.eval_results
    assert (result.dataset_name, result.metric_type, result.metric_value) == (
        "math-skill", "accuracy", accuracy)
    assert card.data.model_name == "s3"


def test_attestation_digests_match_the_files_and_verify_covers_it(chain):
    root, _ = chain
    project = _project(root)
    project.make(["s3"], device="cpu")
    directory = project.path("s3")
    attestation = json.loads((directory / EVALUATION_FILE).read_text())
    assert attestation["predicateType"] == TEST_RESULT_PREDICATE
    for subject in attestation["subject"]:
        data = (directory / subject["name"]).read_bytes()
        assert subject["digest"] == {"sha256": hashlib.sha256(data).hexdigest()}
    assert {s["name"] for s in attestation["subject"]} >= {"model.safetensors", "config.json"}
    predicate = attestation["predicate"]
    assert predicate["result"] == "PASSED" and predicate["failedTests"] == []
    [config] = predicate["configuration"]
    definition = project.mergefile.evals["math-skill"].definition
    assert config["name"] == "math-skill"
    assert config["digest"] == {"sha256": definition.digest()}
    assert config["annotations"]["data"]["data"] == hashlib.sha256(
        (root / "math.jsonl").read_bytes()).hexdigest()
    assert project.verify("s3").ok


def test_eval_and_metrics_commands(chain, capsys):
    root, _ = chain
    args = ["-f", str(root / "Mergefile"), "--cache-dir", str(root / "cache")]
    assert cli.invoke([*args, "make", "--device", "cpu", "s2"]) == 0
    capsys.readouterr()
    # s2 declares nothing; code is a source: eval scores it without building anything
    assert cli.invoke([*args, "eval", "--device", "cpu", "code"]) == 0
    captured = capsys.readouterr()  # progress on stderr, the table (a result) on stdout
    assert captured.err.splitlines()[0] == "evaluating code on code-skill"
    lines = captured.out.splitlines()
    header = lines.index("node  code-skill")
    assert lines[header + 1].split()[0] == "code"
    assert cli.invoke([*args, "metrics", "--json", "math", "s1"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [row["node"] for row in table] == ["math", "s1"]
    assert table[1]["retention"][0]["retained"] == 1.0
    plot = root / "retention.svg"
    assert cli.invoke([*args, "metrics", "--plot", str(plot)]) == 0
    assert plot.read_text().lstrip().startswith("<?xml")
    assert cli.invoke([*args, "eval", "s3"]) == 1  # not built: eval builds nothing
    assert "not built" in capsys.readouterr().err


def test_metrics_diff_against_the_previous_build(chain, capsys):
    root, _ = chain
    args = ["-f", str(root / "Mergefile"), "--cache-dir", str(root / "cache")]
    _project(root).make(["s1"], device="cpu")
    text = (root / "Mergefile").read_text().replace(  # s1 in float32: other bytes
        "    evals: [math-skill]\n  s2:", "    evals: [math-skill]\n    dtype: float32\n  s2:")
    (root / "Mergefile").write_text(text)
    _project(root).make(["s1"], device="cpu")
    capsys.readouterr()
    assert cli.invoke([*args, "metrics", "--json", "--diff", "s1"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert None != row["previous"]["digest"] != row["digest"]
    before = row["previous"]["scores"]["math-skill"]["accuracy"]
    assert before >= 0.8 and row["scores"]["math-skill"]["accuracy"] == before
    assert cli.invoke([*args, "metrics", "--diff", "s1"]) == 0
    assert f"{before:.4g} (+0)" in capsys.readouterr().out


def test_missing_transformers_is_one_line_with_the_install_hint(chain, monkeypatch):
    root, _ = chain
    monkeypatch.setattr(build_evaluation, "installed", lambda name: name != "transformers")
    with pytest.raises(EvaluationError) as error:
        _project(root).make(["s1"], device="cpu")
    assert "\n" not in str(error.value)
    assert "pip install 'mergebuild[eval]'" in str(error.value)
    assert _project(root).store.refs_of(root / "Mergefile").read("s1") is None  # failed before building anything


def test_evals_in_the_mergefile_are_checked_at_parse_time(tmp_path):
    from mergebuild.errors import MergefileError
    from mergebuild.spec.parse import parse_mergefile

    def parse(text):
        return parse_mergefile(textwrap.dedent(text), tmp_path / "Mergefile")

    base = """\
        version: 1
        evals:
          fluency: {kind: perplexity, data: demo://text.txt}
        models:
          base: {source: demo://base, evals: [fluency]}
        """
    assert parse(base).nodes["base"].evals == ("fluency",)
    cases = {
        base.replace("perplexity", "perplexty"): ":3: eval 'fluency': unknown kind 'perplexty'",
        base.replace("demo://text.txt", "nope.txt"): ":3: eval 'fluency': data ",
        base.replace("evals: [fluency]", "evals: [fluncy]"): "did you mean 'fluency'",
        base.replace("data: demo", "window: 1, data: demo"): "window >= 2",
        base + "  m: {merge_method: linear, models: [base], checks: {retain: -1}}\n":
            "'retain' must be a fraction > 0",
        base + "  m: {merge_method: linear, models: [base], checks: {fluency: {mx: 3}}}\n":
            "did you mean 'max'",
    }
    for text, expected in cases.items():
        with pytest.raises(MergefileError) as error:
            parse(text)
        assert expected in str(error.value), str(error.value)
        assert "\n" not in str(error.value)


def test_evals_added_later_are_kept_beside_the_build_and_exported(chain, tmp_path):
    from mergebuild.provenance.statement import ADDED_EVALUATION_FILE
    from mergebuild.verbs.verify import verify_build

    root, _ = chain
    _project(root).make(["s1"], device="cpu")
    text = (root / "Mergefile").read_text().replace(
        "    evals: [math-skill]\n  s2:", "    evals: [math-skill, code-skill]\n  s2:")
    (root / "Mergefile").write_text(text)
    project = _project(root)
    assert [s.status for s in project.plan(["s1"]) if s.name == "s1"] == ["fresh"]
    project.evaluate(["s1"], device="cpu")
    build = project.path("s1")
    assert not (build / ADDED_EVALUATION_FILE).exists()  # the object never changes
    project.export("s1", tmp_path / "out")
    added = json.loads((tmp_path / "out" / ADDED_EVALUATION_FILE).read_text())
    assert [c["name"] for c in added["predicate"]["configuration"]] == ["code-skill"]
    own = json.loads((tmp_path / "out" / EVALUATION_FILE).read_text())
    assert [c["name"] for c in own["predicate"]["configuration"]] == ["math-skill"]
    assert verify_build(tmp_path / "out").ok
    forged = dict(added, subject=[{"name": "model.safetensors", "digest": {"sha256": "0" * 64}}])
    (tmp_path / "out" / ADDED_EVALUATION_FILE).write_text(json.dumps(forged))
    assert not verify_build(tmp_path / "out").ok


def test_the_report_shows_the_stored_scores_and_the_targets_retention(chain):
    root, _ = chain
    project = _project(root)
    project.make(["s3"], device="cpu")
    (target,) = project.report(["s3"], scan=False)
    rows = {(e.model, e.eval, e.ancestor): e for e in target.evaluations}
    math = project.scores("math")["math-skill"]["accuracy"]
    assert rows[("math", "math-skill accuracy", None)].score == math
    kept = rows[("s3", "math-skill accuracy", "math")]  # s3 carries math through unchanged
    assert kept.ancestor_score == math and kept.retention == 1.0 and kept.passed is True
    assert rows[("s3", "math-skill accuracy", None)].passed is True  # its {min: 0.5} check
