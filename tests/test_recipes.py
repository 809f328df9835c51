"""Every ready Mergefile in recipes/ and Mergefile.example validates and builds."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from mergebuild.api import Project

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.Mergefile"))


def test_there_are_recipes_for_the_common_patterns():
    names = {p.name for p in RECIPES}
    assert {"base-plus-instruct.Mergefile", "chat-code-slerp.Mergefile",
            "experts-ties.Mergefile", "merge-plus-lora.Mergefile"} <= names


@pytest.mark.parametrize("path", [*RECIPES, ROOT / "Mergefile.example"], ids=lambda p: p.name)
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
