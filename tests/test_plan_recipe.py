"""Canonical recipes: cosmetic edits keep the key, semantic edits change it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergebuild.io.hashing import recipe_key
from mergebuild.spec.parse import parse_mergefile
from mergebuild.methods.registry import METHODS
from mergebuild.plan.recipe import build_recipe, recipe_changes

BASE = """\
version: 1
models:
  a: {source: /m/a}
  b: {source: /m/b}
  c: {source: /m/c}
  out:
    merge_method: ties
    base_model: a
    models:
      - {model: b, parameters: {weight: 0.5, density: 0.5}}
      - {model: c, parameters: {weight: 0.5, density: 0.5}}
"""


def key_of(text: str, node: str = "out", digests: dict | None = None) -> tuple[str, dict]:
    mf = parse_mergefile(text, Path("/tmp/Mergefile"))
    spec = mf.nodes[node]
    digests = digests or {"a": "xxh128:a", "b": "xxh128:b", "c": "xxh128:c"}
    recipe = build_recipe(spec, METHODS[spec.method], lambda r: digests[r], mf.defaults)
    return recipe_key(recipe), recipe


@pytest.mark.parametrize("edit", [
    lambda t: "# comment\n" + t,
    lambda t: t.replace("merge_method: ties\n    base_model: a", "base_model: a\n    merge_method: ties"),
    lambda t: t.replace("    base_model: a\n", "    base_model: a\n    description: hello\n"),
    lambda t: t.replace("{weight: 0.5, density: 0.5}", "{density: 0.5, weight: 0.5}"),
    lambda t: t.replace("  out:", "  renamed:"),
    lambda t: t + "    parameters: {normalize: true, lambda: 1.0}\n",
    lambda t: t.replace("weight: 0.5, density: 0.5}}\n      - {model: c, parameters: {weight: 0.5, density: 0.5}}",
                        "density: 0.5}}\n      - {model: c, parameters: {density: 0.5}}")
               + "    parameters: {weight: 0.5}\n",
], ids=["comment", "key-order", "description", "param-order", "rename", "explicit-defaults",
        "global-per-parent-default"])
def test_cosmetic_edits_keep_the_key(edit):
    node = "renamed" if "renamed" in edit(BASE) else "out"
    assert key_of(edit(BASE), node)[0] == key_of(BASE)[0]


@pytest.mark.parametrize("edit", [
    lambda t: t.replace("weight: 0.5, density: 0.5}}\n      - {model: c",
                        "weight: 0.6, density: 0.5}}\n      - {model: c"),
    lambda t: t.replace("merge_method: ties", "merge_method: dare_ties"),
    lambda t: t + "    dtype: float16\n",
    lambda t: t + "    parameters: {normalize: false}\n",
    lambda t: t.replace("base_model: a", "base_model: c"),
], ids=["weight", "method", "dtype", "normalize", "base"])
def test_semantic_edits_change_the_key(edit):
    assert key_of(edit(BASE))[0] != key_of(BASE)[0]


def test_parent_digest_enters_the_key_not_its_name():
    k1 = key_of(BASE)[0]
    k2 = key_of(BASE, digests={"a": "xxh128:a", "b": "xxh128:B", "c": "xxh128:c"})[0]
    assert k1 != k2


def test_reasons_name_the_change():
    _, old = key_of(BASE)
    _, new = key_of(BASE.replace("weight: 0.5, density: 0.5}}\n      - {model: c",
                                 "weight: 0.7, density: 0.5}}\n      - {model: c"),
                    digests={"a": "xxh128:a", "b": "xxh128:b", "c": "xxh128:C"})
    reasons = recipe_changes(old, new, {"base": "a", "donor": "a", "models": ["b", "c"]})
    assert reasons == ["parameter changed: weight of b 0.5 → 0.7", "parent changed: c"]
