"""Every ready Mergefile in recipes/ and Mergefile.example validates and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from mergebuild.api import Project

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.Mergefile"))
# The recipe that shows a failing gate (its own test below).
GATE_FAILS = ROOT / "recipes" / "gate-slerp-loses-math.Mergefile"


def test_there_are_recipes_for_the_common_patterns():
    names = {p.name for p in RECIPES}
    assert {"base-plus-instruct.Mergefile", "chat-code-slerp.Mergefile",
            "experts-ties.Mergefile", "merge-plus-lora.Mergefile"} <= names


@pytest.mark.parametrize("path", [*(p for p in RECIPES if p != GATE_FAILS),
                                  ROOT / "Mergefile.example"], ids=lambda p: p.name)
def test_recipe_builds(path, tmp_path):
    text = path.read_text()
    assert text.startswith("#"), "a recipe opens with a comment on when to use it"
    project = Project(path, tmp_path / "cache")
    result = project.make([])
    assert result.ok
    assert result.count("built") >= 1
    for name in (r.name for r in result.results):
        out = load_file(project.path(name) / "model.safetensors")
        assert out and all(t.isfinite().all() for t in out.values())


def test_gate_recipe_fails_its_gate_and_skips_the_child(tmp_path):
    project = Project(GATE_FAILS, tmp_path / "cache")
    result = project.make([], keep_going=True, device="cpu")
    outcomes = {r.name: r.outcome for r in result.results}
    assert outcomes == {"chat-math": "failed", "release": "skipped"}
    failed = next(r for r in result.results if r.name == "chat-math").failed_checks
    assert {(c.eval, c.ancestor) for c in failed} == {("chat-skill", "chat"),
                                                       ("math-skill", "math")}
    assert all(c.value < c.threshold for c in failed)
    assert project.store.refs_of(project.mergefile.path).read("chat-math") is not None  # kept for inspection
