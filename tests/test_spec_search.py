"""Searches in the Mergefile: search: parsed into a SearchSpec, trial names, one-line errors."""

from __future__ import annotations

import sys

import pytest

from mergebuild.errors import MergefileError
from mergebuild.spec.graph import build_graph, default_targets
from mergebuild.spec.model import SearchDimension, SearchSpec, SelectSpec
from mergebuild.spec.search import rounded, trial_spec

SEARCHED = """\
version: 1
evals:
  math-skill: {kind: accuracy, data: "demo://math.jsonl", max_new_tokens: 6}
models:
  base: {source: demo://base}
  math: {source: demo://math, evals: [math-skill]}
  code: {source: demo://code}
  tuned:
    merge_method: dare_ties
    base_model: base
    models:
      - {model: math, parameters: {weight: 0.5}}
      - {model: code, parameters: {weight: 0.5}}
    parameters: {density: 0.5}
    search:
SEARCH
    select: SELECT
"""
SEARCH = """\
      sampler: tpe
      trials: 24
      seed: 7
      space: {density: [0.2, 0.9], models.math.weight: [0.1, 1.0], lambda: [1, 3],
              parameters.normalize: [true, false]}"""


def load(tmp_path, search: str = SEARCH, select: str = "{maximize: math-skill}",
         extra: str = ""):
    from mergebuild.spec.parse import load_mergefile

    path = tmp_path / "Mergefile"
    path.write_text(SEARCHED.replace("SEARCH\n", search + "\n").replace("SELECT", select)
                    + extra)
    return load_mergefile(path)


def test_search_is_parsed_into_a_search_spec(tmp_path):
    mf = load(tmp_path)
    spec = mf.nodes["tuned"]
    assert isinstance(spec, SearchSpec)
    assert (spec.sampler, spec.trials, spec.seed) == ("tpe", 24, 7)
    assert spec.select == SelectSpec("maximize", "math-skill")
    assert spec.space == (
        SearchDimension("density", "float", 0.2, 0.9),
        SearchDimension("models.math.weight", "float", 0.1, 1.0),
        SearchDimension("lambda", "int", 1, 3),
        SearchDimension("parameters.normalize", "categorical", choices=(True, False)))
    assert spec.template.method == "dare_ties" and spec.template.name == "tuned"
    # No trial exists before the study runs: the search hangs off the template's parents.
    assert not any("[" in name for name in mf.nodes)
    graph = build_graph(mf)
    assert sorted(graph.pred["tuned"]) == ["base", "code", "math"]
    assert default_targets(graph) == ["tuned"]


def test_sampler_and_seed_have_defaults(tmp_path):
    spec = load(tmp_path, "      trials: 3\n      space: {density: [0.2, 0.9]}").nodes["tuned"]
    assert (spec.sampler, spec.seed) == ("tpe", 0)


def test_a_trial_is_the_template_with_its_values_named_for_them(tmp_path):
    mf = load(tmp_path)
    spec = mf.nodes["tuned"]
    point = {"density": 0.4137, "models.math.weight": 0.62, "lambda": 2,
             "parameters.normalize": False}
    trial = trial_spec(mf, spec, point)
    assert trial.name == "tuned[density=0.4137,math.weight=0.62,lambda=2,normalize=false]"
    assert trial.parameters["density"] == 0.4137 and trial.parameters["lambda"] == 2
    assert trial.models[0].parameters == {"weight": 0.62}
    assert trial.models[1].parameters == {"weight": 0.5}
    # written as the merge it is (its provenance's excerpt): the values set, no search
    written = trial.plain()
    assert "search" not in written and "select" not in written
    assert written["parameters"] == {"density": 0.4137, "lambda": 2, "normalize": False}
    assert written["models"] == [{"model": "math", "parameters": {"weight": 0.62}},
                                 {"model": "code", "parameters": {"weight": 0.5}}]


def test_suggested_floats_are_rounded_to_four_significant_digits_within_the_range():
    dimension = SearchDimension("t", "float", 0.2, 0.9)
    assert rounded(dimension, 0.41374999) == 0.4137
    assert rounded(dimension, 0.899996) == 0.9  # rounding up stays inside [low, high]
    assert rounded(dimension, 0.2000004) == 0.2
    assert rounded(SearchDimension("k", "int", 1, 5), 3) == 3
    assert rounded(SearchDimension("c", "categorical", choices=("a", "b")), "b") == "b"


@pytest.mark.parametrize(("search", "select", "message", "hint"), [
    ("      sampler: tpee\n      trials: 3\n      space: {density: [0.2, 0.9]}", None,
     "unknown sampler 'tpee'", "did you mean 'tpe'?"),
    ("      trials: 0\n      space: {density: [0.2, 0.9]}", None,
     "'trials' must be a whole number from 1 to 1000, got 0", "trials: 24"),
    ("      trials: 5000\n      space: {density: [0.2, 0.9]}", None,
     "from 1 to 1000, got 5000", None),
    ("      trials: true\n      space: {density: [0.2, 0.9]}", None,
     "'trials' must be a whole number", None),
    ("      trials: 3\n      seed: -1\n      space: {density: [0.2, 0.9]}", None,
     "'seed' must be a whole number from 0 to 4294967295, got -1", None),
    ("      trials: 3\n      seed: 1.5\n      space: {density: [0.2, 0.9]}", None,
     "'seed' must be a whole number", None),
    ("      trials: 3", None, "'search' needs a 'space'", "space: {density:"),
    ("      trials: 3\n      space: {density: [0.9, 0.2]}", None,
     "space 'density': low 0.9 must be below high 0.2", "density: [0.2, 0.9]"),
    ("      trials: 3\n      space: {density: 0.5}", None,
     "space 'density' must be [low, high] or a list of choices", None),
    ("      trials: 3\n      space: {models.maths.weight: [0.1, 1.0]}", None,
     "sweep path 'models.maths.weight' names no model of this merge",
     "did you mean 'math'?"),
    ("      trials: 3\n      space: {density: [0.2, 3.0]}", None,
     "the space reaches [density=3.0]: parameter 'density' must be <= 1.0", None),
    ("      trails: 3\n      space: {density: [0.2, 0.9]}", None,
     "unknown key 'trails'", "did you mean 'trials'?"),
    ("      sampler: cmaes\n      trials: 3\n      space: {normalize: [true, false]}", None,
     "the cmaes sampler searches numbers; 'normalize' is a list of choices",
     "use sampler: tpe or random"),
    ("      trials: 3\n      space: {density: [0.2, 0.9]}", "{maximize: maths-skill}",
     "select: unknown eval 'maths-skill'", "did you mean 'math-skill'?"),
])
def test_a_bad_search_is_one_line_naming_node_and_line(tmp_path, search, select, message,
                                                        hint):
    with pytest.raises(MergefileError) as caught:
        load(tmp_path, search, select or "{maximize: math-skill}")
    text = str(caught.value)
    assert "\n" not in text
    assert message in text
    assert "node 'tuned'" in text and caught.value.line is not None
    if hint is not None:
        assert hint in text


def test_trial_names_must_fit_a_node_name(tmp_path):
    paths = ["models.math.weight", "models.math.density", "models.code.weight",
             "models.code.density", "density", "lambda"]
    space = ", ".join(f"{path}: [0.1, 0.9]" for path in paths)
    with pytest.raises(MergefileError) as caught:
        load(tmp_path, f"      trials: 3\n      space: {{{space}}}")
    # tuned[math.weight=-1.234e-05,...]: every float at its widest, 10 characters
    assert "its trials' names would be up to 137 characters long" in str(caught.value)
    assert "within 128" in str(caught.value) and caught.value.line == 15


def test_search_needs_select_and_excludes_sweep(tmp_path):
    path = tmp_path / "Mergefile"
    text = SEARCHED.replace("SEARCH\n", "      trials: 3\n      space: {density: [0.2, 0.9]}\n")
    path.write_text(text.replace("    select: SELECT\n", ""))
    from mergebuild.spec.parse import load_mergefile

    with pytest.raises(MergefileError, match="a search needs 'select'"):
        load_mergefile(path)
    path.write_text(text.replace("SELECT", "{maximize: math-skill}")
                    + "    sweep: {density: [0.3, 0.5]}\n")
    with pytest.raises(MergefileError, match="either 'sweep' .* or 'search'") as caught:
        load_mergefile(path)
    assert caught.value.line == 15  # the search: line
    path.write_text(text.replace("SELECT", "{maximize: math-skill}").replace(
        "  math-skill", "  unused").replace("evals: [math-skill]", ""))
    with pytest.raises(MergefileError, match="select: unknown eval 'math-skill'"):
        load_mergefile(path)


def test_a_search_without_evals_is_refused(tmp_path):
    path = tmp_path / "Mergefile"
    text = SEARCHED.replace("SEARCH\n", "      trials: 3\n      space: {density: [0.2, 0.9]}\n")
    text = text.replace("SELECT", "{maximize: retention}").replace(
        "evals:\n  math-skill: {kind: accuracy, data: \"demo://math.jsonl\", "
        "max_new_tokens: 6}\n", "").replace(", evals: [math-skill]", "")
    path.write_text(text)
    from mergebuild.spec.parse import load_mergefile

    with pytest.raises(MergefileError, match="has no 'evals:'"):
        load_mergefile(path)


def test_without_optuna_a_search_fails_in_one_line_naming_the_extra(tmp_path, monkeypatch):
    from mergebuild.api import Project

    load(tmp_path, "      trials: 3\n      space: {density: [0.2, 0.9]}")
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    project = Project(tmp_path / "Mergefile", tmp_path / "cache")
    with pytest.raises(MergefileError) as caught:
        project.plan(["tuned"])
    text = str(caught.value)
    assert "\n" not in text and "node 'tuned'" in text
    assert "a search needs optuna, which is not installed" in text
    assert "pip install 'mergebuild[search]'" in text
    # Nodes that are not searches plan as before.
    assert [s.name for s in project.plan(["math"])] == ["math"]
