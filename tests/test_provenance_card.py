"""Tests for mergebuild.provenance.card: Hugging Face model cards with the whole lineage."""

from __future__ import annotations

import dataclasses

import pytest
from huggingface_hub import ModelCard
from test_provenance_statement import HUB_BASE, HUB_MATH, LOCAL_CHAT, build_chain

from mergebuild.provenance.card import render_card


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, dict]:
    return build_chain(tmp_path_factory.mktemp("chain"))


def test_card_parses_with_hub_metadata(chain):
    card = ModelCard(render_card(chain["final"]["record"]))
    assert card.data.base_model == ["base-org/base-7b", "code-org/coder-7b", "math-org/math-7b"]
    assert card.data.base_model_relation == "merge"
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["merge", "mergebuild", "linear", "slerp", "ties"]


def test_base_model_reaches_through_local_intermediates(chain):
    # final's direct parents are B (a local intermediate) and math; the rest is upstream.
    direct = [p.uri for p in chain["final"]["record"].parents if p.kind == "hub"]
    assert direct == ["hf://math-org/math-7b"]
    assert "code-org/coder-7b" in ModelCard(render_card(chain["final"]["record"])).data.base_model


def test_base_model_is_deduplicated_and_order_independent(chain):
    record = chain["final"]["record"]
    reversed_parents = dataclasses.replace(record, parents=tuple(reversed(record.parents)))
    expected = ["base-org/base-7b", "code-org/coder-7b", "math-org/math-7b"]
    assert ModelCard(render_card(reversed_parents)).data.base_model == expected


def test_card_bytes_are_identical_across_renders(chain):
    record = chain["final"]["record"]
    assert render_card(record).encode() == render_card(record).encode()


def test_written_card_is_the_rendered_card(chain):
    stage = chain["final"]
    assert (stage["dir"] / "README.md").read_text() == render_card(stage["record"])


def test_card_ignores_run_times_and_invocation(chain):
    record = chain["final"]["record"]
    later = dataclasses.replace(
        record, started="2030-01-01T00:00:00Z", finished="2030-01-01T01:00:00Z", invocation_id="x"
    )
    assert render_card(later) == render_card(record)


def test_mermaid_diagram_has_every_stage_and_edge(chain):
    text = render_card(chain["final"]["record"])
    mermaid = text.split("```mermaid\n", 1)[1].split("```", 1)[0]
    assert mermaid.startswith("graph TD\n")
    for label in ('"A<br/>ties', '"B<br/>slerp', '"final<br/>linear', '"chat<br/>local'):
        assert label in mermaid
    assert mermaid.count('"code-org/coder-7b<br/>@ v1.0') == 1  # shared parent drawn once
    assert mermaid.count("-->") == 7


def test_lineage_table_lists_stages_with_parents_revisions_and_digests(chain):
    text = render_card(chain["final"]["record"])
    rows = {
        line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")
    }
    assert "ties" in rows["`A`"] and "coder.weight=0.6" in rows["`A`"]
    assert f"(commit `{HUB_BASE.commit[:12]}`)" in rows["`A`"]
    assert "base: `base-org/base-7b` @ `main`" in rows["`A`"]
    assert f"`{LOCAL_CHAT.digest[:19]}`" in rows["`A`"]
    assert "t=0.3" in rows["`B`"]
    b_digest = chain["B"]["record"].digest
    assert f"model: `B` `{b_digest[:19]}`" in rows["`final`"]
    assert f"`{HUB_MATH.commit}`" in rows["`math`"]


def test_card_shows_this_nodes_parameters_and_how_to_rebuild(chain):
    record = chain["final"]["record"]
    text = render_card(record)
    assert "## Merge parameters of `final`" in text
    assert "tokenizer_source: base" in text
    assert "```yaml\n" + record.mergefile_excerpt + "```" in text
    assert "```sh\nmergebuild -f Mergefile make final\n```" in text
    assert record.digest in text


def test_card_gives_per_parent_evaluation_advice(chain):
    text = render_card(chain["final"]["record"])
    advice = text.split("## Evaluation advice", 1)[1].split("\n## ", 1)[0]
    assert "not only on averaged benchmarks" in advice
    for parent in ("base-org/base-7b", "code-org/coder-7b", "math-org/math-7b", "`chat`"):
        assert parent in advice


def test_card_without_hub_sources_has_no_base_model(chain):
    record = dataclasses.replace(chain["A"]["record"], parents=(LOCAL_CHAT,))
    card = ModelCard(render_card(record))
    assert card.data.base_model is None
    assert card.data.tags == ["merge", "mergebuild", "ties"]


def test_fences_survive_backticks_in_the_excerpt(chain):
    record = dataclasses.replace(
        chain["A"]["record"], mergefile_excerpt="A:\n  description: see ```code```\n"
    )
    assert "````yaml\nA:\n  description: see ```code```\n````" in render_card(record)


def test_local_source_in_a_hugging_face_cache_snapshot_names_its_repo(workspace, tmp_path):
    """A local source that is a snapshot directory of the HF cache is that repo at that
    commit: the card's base_model lists it and its table shows the commit; a plain local
    directory stays anonymous."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--acme--chat-7b" / "snapshots" / commit
    shutil.copytree(workspace.models / "chat", snapshot)
    workspace.write(f"""
        version: 1
        models:
          base: {{{{source: {{models}}/base}}}}
          chat: {{{{source: {snapshot}}}}}
          out:
            merge_method: linear
            models: [{{{{model: base, parameters: {{{{weight: 0.5}}}}}}}},
                     {{{{model: chat, parameters: {{{{weight: 0.5}}}}}}}}]
        """)
    project = workspace.project()
    assert project.make(["out"]).ok
    text = (project.path("out") / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model == ["acme/chat-7b"]
    assert card.data.base_model_relation == "merge"
    row = next(line for line in text.splitlines() if line.startswith("| `chat` |"))
    assert "Hugging Face cache of `acme/chat-7b`" in row and f"`{commit[:12]}" in row
    row = next(line for line in text.splitlines() if line.startswith("| `base` |"))
    assert "Hugging Face cache" not in row
