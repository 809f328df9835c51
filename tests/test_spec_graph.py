"""The DAG: order, cycles, default targets and renderings."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergebuild.errors import GraphError
from mergebuild.spec.graph import build_graph, build_order, default_targets, render_mermaid
from mergebuild.spec.parse import parse_mergefile

TEXT = """\
version: 1
models:
  a: {source: ./a}
  b: {source: ./b}
  ab:
    merge_method: linear
    models: [{model: a, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]
  abb:
    merge_method: linear
    models: [{model: ab, parameters: {weight: 1}}, {model: b, parameters: {weight: 1}}]
  other:
    merge_method: linear
    models: [{model: a, parameters: {weight: 1}}]
"""


def graph(text=TEXT):
    return build_graph(parse_mergefile(text, Path("/p/Mergefile")))


def test_order_is_parents_first_and_only_what_the_target_needs():
    assert build_order(graph(), ["abb"]) == ["a", "b", "ab", "abb"]


def test_default_targets_are_the_final_merges():
    assert default_targets(graph()) == ["abb", "other"]


def test_cycle_of_three_is_reported_with_its_path():
    text = """\
version: 1
models:
  x:
    merge_method: linear
    models: [{model: z, parameters: {weight: 1}}]
  y:
    merge_method: linear
    models: [{model: x, parameters: {weight: 1}}]
  z:
    merge_method: linear
    models: [{model: y, parameters: {weight: 1}}]
"""
    with pytest.raises(GraphError, match=r"cycle: x → y → z → x"):
        graph(text)


def test_mermaid_has_every_edge():
    text = render_mermaid(graph())
    for edge in ("n_a --> n_ab", "n_b --> n_ab", "n_ab --> n_abb", "n_b --> n_abb"):
        assert edge in text
