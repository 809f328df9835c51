"""RELIABILITY.md is generated from the fault and bad-input tables and must match them."""

from __future__ import annotations

from pathlib import Path

from gen_reliability import render


def test_reliability_md_is_in_step_with_the_test_tables():
    doc = Path(__file__).resolve().parent.parent / "RELIABILITY.md"
    assert doc.read_text() == render(), "run: python tests/gen_reliability.py"
