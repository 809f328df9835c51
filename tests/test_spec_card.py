"""The Mergefile's `card:` block: Hub metadata validated offline, licence warnings, and a card
that lives beside the object, so editing it rebuilds nothing and still verifies."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard, ModelCardData

from mergebuild.cli import main
from mergebuild.errors import MergefileError
from mergebuild.provenance.card import split_front_matter
from mergebuild.spec.parse import parse_mergefile

MERGEFILE = """\
version: 1
card:
  license: {licence}
  language: [en]
  tags: [house-style]
models:
  chat: {{source: {models}/chat, card: {{license: apache-2.0}}}}
  code: {{source: {models}/code, card: {{license: {code_licence}}}}}
  math: {{source: {models}/math}}
  chat-code:
    merge_method: slerp
    base_model: chat
    models: [{{model: chat}}, {{model: code}}]
    parameters: {{t: 0.4}}
    card:
      pipeline_tag: text-generation
      datasets: [org/code-corpus]
      tags: [code]
      introduction: {intro}
"""


def run(ws, *args):
    return CliRunner().invoke(main, ["-f", str(ws.mergefile), "--cache-dir", str(ws.cache),
                                     *args], obj={})


def write(ws, licence="apache-2.0", code_licence="apache-2.0", intro="A chat model that codes."):
    ws.mergefile.write_text(MERGEFILE.format(models=ws.models, licence=licence,
                                             code_licence=code_licence, intro=intro))


def test_card_blocks_parse_with_defaults_under_the_node(workspace):
    write(workspace)
    mergefile = parse_mergefile(workspace.mergefile.read_text(), workspace.mergefile)
    card = mergefile.card_of("chat-code")
    assert card.license == "apache-2.0" and card.language == ("en",)
    assert card.tags == ("house-style", "code")
    assert card.pipeline_tag == "text-generation" and card.datasets == ("org/code-corpus",)
    assert mergefile.nodes["code"].license == "apache-2.0"


@pytest.mark.parametrize("block, message", [
    ("card: {license: apache2}", "card 'license': 'apache2' is not a Hugging Face licence id "
     "(did you mean 'apache-2.0'?)"),
    ("card: {pipeline_tag: text-gen}", "card 'pipeline_tag': 'text-gen' is not a Hugging Face "
     "task"),
    ("card: {licence: mit}", "unknown card key 'licence' (did you mean 'license'?)"),
    ("card: {language: [English]}", "card 'language': 'English' is not an ISO 639 language"),
    ("card: {license: other}", "card 'license: other' needs 'license_name' and 'license_link'"),
])
def test_bad_card_values_are_one_line_errors(workspace, block, message):
    text = f"version: 1\nmodels:\n  a: {{source: {workspace.models}/chat}}\n" \
           f"  m:\n    merge_method: linear\n    models: [{{model: a, parameters: {{weight: 1}}}}]\n" \
           f"    {block}\n"
    with pytest.raises(MergefileError) as error:
        parse_mergefile(text, workspace.mergefile)
    assert message in str(error.value)
    assert "node 'm'" in str(error.value) and ":7:" in str(error.value)


def test_a_source_card_only_declares_a_licence(workspace):
    text = f"version: 1\nmodels:\n  a: {{source: {workspace.models}/chat, card: {{tags: [x]}}}}\n"
    with pytest.raises(MergefileError, match="unknown card key 'tags'"):
        parse_mergefile(text, workspace.mergefile)


def test_editing_only_the_card_rebuilds_nothing_and_still_reproduces(workspace, tmp_path):
    write(workspace)
    assert run(workspace, "make", "chat-code").exit_code == 0
    build = workspace.project().path("chat-code")
    own_card = (build / "README.md").read_bytes()
    write(workspace, licence="mit", intro="Now under MIT.")
    plan = run(workspace, "plan", "chat-code")
    assert plan.output.endswith("nothing to do: every node is up to date\n")
    made = run(workspace, "make", "chat-code")
    assert "0 built" in made.output
    assert workspace.project().path("chat-code") == build
    assert (build / "README.md").read_bytes() == own_card  # the object never changes
    check = run(workspace, "make", "--check", "chat-code")
    assert check.exit_code == 0, check.output
    assert "NOT reproduced" not in check.output

    dest = tmp_path / "out"
    assert run(workspace, "export", "chat-code", str(dest)).exit_code == 0
    text = (dest / "README.md").read_text()
    card = ModelCard(text)  # huggingface_hub parses it; its metadata builds ModelCardData
    data = ModelCardData(**card.data.to_dict())
    assert data.license == "mit" and data.language == ["en"]
    assert data.pipeline_tag == "text-generation" and data.datasets == ["org/code-corpus"]
    assert data.tags == ["merge", "mergebuild", "slerp", "house-style", "code"]
    assert data.base_model is None and data.library_name == "transformers"
    assert "# chat-code\n\nNow under MIT.\n" in text
    assert "parents' licences" not in text  # chat and code are both apache-2.0
    verified = run(workspace, "verify", str(dest))
    assert verified.exit_code == 0, verified.output
    path = run(workspace, "path", "chat-code", "--card")
    assert path.output.strip().endswith("/README.md") and "/cards/" in path.output
    attestation = json.loads((dest / "card.json").read_text())
    assert attestation["predicate"]["card"]["license"] == "mit"


def test_parents_licences_that_differ_or_are_unknown_are_warned(workspace, tmp_path):
    write(workspace, code_licence="cc-by-nc-4.0")
    made = run(workspace, "make", "chat-code")
    assert made.exit_code == 0
    assert ("mergebuild: warning: chat-code: the parents' licences differ (chat: apache-2.0, "
            "code: cc-by-nc-4.0); the merge must satisfy every one of them") in made.output
    text = workspace.project().card("chat-code").text
    assert "> **Warning:** the parents' licences differ" in text
    assert "| `code` | `cc-by-nc-4.0` |" in text

    workspace.mergefile.write_text(workspace.mergefile.read_text().replace(
        "base_model: chat\n    models: [{model: chat}, {model: code}]",
        "base_model: chat\n    models: [{model: chat}, {model: math}]"))
    made = run(workspace, "make", "chat-code")
    assert "the licence of math is unknown" in made.output
    metadata, _ = split_front_matter(workspace.project().card("chat-code").text)
    assert metadata["license"] == "apache-2.0"  # declared at the top level


def test_a_changed_or_foreign_card_fails_verify(workspace, tmp_path):
    write(workspace)
    assert run(workspace, "make", "chat-code").exit_code == 0
    dest = tmp_path / "out"
    assert run(workspace, "export", "chat-code", str(dest)).exit_code == 0
    card = dest / "README.md"
    card.write_text(card.read_text().replace("apache-2.0", "mit"))
    result = run(workspace, "verify", str(dest))
    assert result.exit_code == 1 and result.output.startswith("README.md: truncated")
    attestation = json.loads((dest / "card.json").read_text())
    attestation["predicate"]["build"]["digest"] = "sha256:" + "1" * 64
    (dest / "card.json").write_text(json.dumps(attestation))
    result = run(workspace, "verify", str(dest))
    assert "card.json: invalid-provenance: attests a card of build sha256:111111111111" \
        in result.output
