"""Tokenizer policies: embedding rows mapped by token, union vocabularies, mismatch errors."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild.errors import IncompatibleModelsError
from mergebuild.build.vocab import VocabPlan, remap_rows, union_tokenizer, vocab_of_tokenizer

NEW_TOKENS = ("<tool>", "<think>")


def _plan(perms: dict[str, tuple[int, ...]], base: str | None, rows: int | None = None):
    tokens = len(next(iter(perms.values())))
    return VocabPlan(rows=rows or tokens, tokens=tokens, permutations=perms, base=base,
                     tokenizer=None, identity=False)


def test_missing_token_takes_the_base_row():
    base = torch.tensor([[1.0], [2.0], [3.0]])
    model = torch.tensor([[10.0], [20.0]])  # lacks token 2
    plan = _plan({"b": (0, 1, 2), "m": (0, 1, -1)}, base="b")
    out_b, out_m = remap_rows([base, model], ["b", "m"], plan)
    torch.testing.assert_close(out_b, base)
    torch.testing.assert_close(out_m, torch.tensor([[10.0], [20.0], [3.0]]))


def test_without_base_a_missing_token_takes_the_mean_of_those_that_have_it():
    a = torch.tensor([[1.0], [2.0], [4.0]])
    b = torch.tensor([[3.0], [6.0], [8.0]])
    c = torch.tensor([[5.0], [7.0]])  # lacks token 2; rows reordered below
    plan = _plan({"a": (0, 1, 2), "b": (0, 1, 2), "c": (1, 0, -1)}, base=None, rows=4)
    out_a, _, out_c = remap_rows([a, b, c], ["a", "b", "c"], plan)
    torch.testing.assert_close(out_c[:3], torch.tensor([[7.0], [5.0], [6.0]]))
    # padding rows (pad_to_multiple_of) are the mean of the token rows
    torch.testing.assert_close(out_a[3], torch.tensor([7.0 / 3]))


def test_union_tokenizer_appends_missing_tokens_in_parent_order():
    base = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}, "added_tokens": []}
    other = {"model": {"type": "BPE", "vocab": {"b": 0, "c": 1, "d": 2}},
             "added_tokens": [{"id": 3, "content": "<x>", "special": True}]}
    out = union_tokenizer(base, [(base, 2), (other, 4)])
    assert vocab_of_tokenizer(out) == {"a": 0, "b": 1, "c": 2, "d": 3, "<x>": 4}
    assert out["added_tokens"][-1]["special"] is True
    assert base["added_tokens"] == []  # the input is not modified


def _extended_model(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """A copy of ``src`` with NEW_TOKENS added: two more embedding and lm_head rows."""
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = torch.full((len(NEW_TOKENS), weights[name].shape[1]), 0.5, dtype=weights[name].dtype)
        weights[name] = torch.cat([weights[name], extra])
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    tok = json.loads((dst / "tokenizer.json").read_text())
    n = len(vocab_of_tokenizer(tok))
    for i, t in enumerate(NEW_TOKENS):
        tok["added_tokens"].append({"id": n + i, "content": t, "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False,
                                    "special": True})
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] = n + len(NEW_TOKENS)
    (dst / "config.json").write_text(json.dumps(config))
    return weights


MERGEFILE = """\
version: 1
models:
  base: {{source: {base}}}
  wide: {{source: {wide}}}
  merged:
    merge_method: linear
    base_model: base
    models:
      - {{model: base, parameters: {{weight: 0.5}}}}
      - {{model: wide, parameters: {{weight: 0.5}}}}
    dtype: float32
{policy}"""


@pytest.fixture
def wide(demo_models, tmp_path):
    return _extended_model(demo_models["instruct"], tmp_path / "wide")


def _make(workspace, demo_models, tmp_path, policy: str):
    workspace.mergefile.write_text(MERGEFILE.format(
        base=demo_models["base"], wide=tmp_path / "wide", policy=textwrap.indent(policy, "    ")))
    project = workspace.project()
    project.make(["merged"])
    return project.path("merged")


def test_vocab_mismatch_without_policy_names_both_sizes(workspace, demo_models, tmp_path, wide):
    with pytest.raises(IncompatibleModelsError, match="256 tokens.*258"):
        _make(workspace, demo_models, tmp_path, "")


def test_tokenizer_source_base_maps_rows_by_token(workspace, demo_models, tmp_path, wide):
    out_dir = _make(workspace, demo_models, tmp_path, "tokenizer_source: base\n")
    out = load_file(str(out_dir / "model.safetensors"))
    base = load_file(str(demo_models["base"] / "model.safetensors"))
    name = "model.embed_tokens.weight"
    assert out[name].shape == base[name].shape
    torch.testing.assert_close(out[name], 0.5 * base[name].float() + 0.5 * wide[name][:256].float())
    assert json.loads((out_dir / "config.json").read_text())["vocab_size"] == 256


def test_tokenizer_union_builds_a_merged_tokenizer(workspace, demo_models, tmp_path, wide):
    out_dir = _make(workspace, demo_models, tmp_path, "tokenizer: {source: union}\n")
    out = load_file(str(out_dir / "model.safetensors"))
    base = load_file(str(demo_models["base"] / "model.safetensors"))
    name = "lm_head.weight"
    assert out[name].shape[0] == 258
    # the new tokens exist only in 'wide': every parent takes its row
    torch.testing.assert_close(out[name][256:], torch.full((2, out[name].shape[1]), 0.5))
    torch.testing.assert_close(out[name][:256],
                               0.5 * base[name].float() + 0.5 * wide[name][:256].float())
    tok = json.loads((out_dir / "tokenizer.json").read_text())
    vocab = vocab_of_tokenizer(tok)
    assert vocab["<tool>"] == 256 and vocab["<think>"] == 257
    assert json.loads((out_dir / "config.json").read_text())["vocab_size"] == 258
    transformers = pytest.importorskip("transformers")
    loaded = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"))
    assert loaded.convert_tokens_to_ids("<think>") == 257


def test_union_tokenizer_config_lists_the_merged_added_tokens(workspace, demo_models, tmp_path,
                                                              wide):
    out_dir = _make(workspace, demo_models, tmp_path, "tokenizer: {source: union}\n")
    decoder = json.loads((out_dir / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    added = json.loads((out_dir / "tokenizer.json").read_text())["added_tokens"]
    assert {int(i): e["content"] for i, e in decoder.items()} == {
        e["id"]: e["content"] for e in added}
    assert decoder["257"] == {"content": "<think>", "lstrip": False, "normalized": False,
                              "rstrip": False, "single_word": False, "special": True}
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert len(tokenizer) == 258
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.convert_tokens_to_ids(["<tool>", "<think>"]) == [256, 257]
    assert tokenizer.added_tokens_decoder[257].special
    ids = tokenizer("a <think> b").input_ids
    assert 257 in ids and "<think>" not in tokenizer.decode(ids, skip_special_tokens=True)


SLICES = """\
version: 1
models:
  base: {{source: {base}}}
  other: {{source: {other}}}
  stack:
    merge_method: passthrough
    slices:
      - sources: [{{model: base, layer_range: [0, 1]}}]
      - sources: [{{model: other, layer_range: [1, 2]}}]
    tokenizer_source: base
    dtype: float32
"""


def test_slices_with_a_shared_vocabulary_accept_tokenizer_source(workspace, demo_models):
    workspace.mergefile.write_text(SLICES.format(base=demo_models["base"],
                                                 other=demo_models["instruct"]))
    project = workspace.project()
    project.make(["stack"])
    out = load_file(str(project.path("stack") / "model.safetensors"))
    other = load_file(str(demo_models["instruct"] / "model.safetensors"))
    torch.testing.assert_close(out["lm_head.weight"], other["lm_head.weight"].float())


def _shuffled_model(src: Path, dst: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A copy of ``src`` whose ordinary tokens have other ids (rows moved with them), plus
    NEW_TOKENS: the same token strings mostly sit at other rows than in ``src``."""
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    old = vocab_of_tokenizer(tok)
    specials = {e["id"] for e in tok["added_tokens"]}
    ordinary = sorted((i, t) for t, i in tok["model"]["vocab"].items() if i not in specials)
    ids = [i for i, _ in ordinary]
    tok["model"]["vocab"] = {t: new for (_, t), new in zip(ordinary, reversed(ids), strict=True)}
    n = len(old)
    for i, t in enumerate(NEW_TOKENS):
        tok["added_tokens"].append({"id": n + i, "content": t, "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False,
                                    "special": True})
    new = vocab_of_tokenizer(tok)
    order = torch.tensor([old[t] for t, _ in sorted(new.items(), key=lambda kv: kv[1])
                          if t in old])
    weights = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = weights[name]
        extra = torch.randn(len(NEW_TOKENS), w.shape[1], generator=g).to(w.dtype)
        weights[name] = torch.cat([w[order], extra])
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] = len(new)
    (dst / "config.json").write_text(json.dumps(config))
    return weights, new


STACK = """\
version: 1
models:
  anchor: {{source: {anchor}}}
  shuffled: {{source: {shuffled}}}
  stack:
    merge_method: passthrough
    slices:
      - sources: [{{model: {first}, layer_range: [0, 1]}}]
      - sources: [{{model: {last}, layer_range: [1, 3]}}]
    tokenizer_source: {policy}
    dtype: float32
"""


@pytest.fixture
def shuffled(demo_models, tmp_path):
    return _shuffled_model(demo_models["instruct"], tmp_path / "shuffled")


def _stack(workspace, demo_models, tmp_path, first: str, last: str, policy: str):
    workspace.mergefile.write_text(STACK.format(
        anchor=demo_models["base"], shuffled=tmp_path / "shuffled", first=first, last=last,
        policy=policy))
    project = workspace.project()
    project.make(["stack"])
    out_dir = project.path("stack")
    return out_dir, load_file(str(out_dir / "model.safetensors"))


def _rows_by_token(out: torch.Tensor, out_vocab: dict[str, int], src: torch.Tensor,
                   src_vocab: dict[str, int]) -> int:
    shared = [t for t in out_vocab if t in src_vocab]
    torch.testing.assert_close(out[[out_vocab[t] for t in shared]],
                               src[[src_vocab[t] for t in shared]].float(), rtol=0, atol=0)
    return len(shared)


@pytest.mark.parametrize("end", ["first", "last"])
def test_slices_map_the_ends_rows_onto_the_donor_vocabulary(workspace, demo_models, tmp_path,
                                                            shuffled, end):
    weights, shuffled_vocab = shuffled
    first, last = ("shuffled", "anchor") if end == "first" else ("anchor", "shuffled")
    out_dir, out = _stack(workspace, demo_models, tmp_path, first, last, "anchor")
    anchor_dir = demo_models["base"]
    anchor_vocab = vocab_of_tokenizer(json.loads((anchor_dir / "tokenizer.json").read_text()))
    name = "model.embed_tokens.weight" if end == "first" else "lm_head.weight"
    assert out[name].shape[0] == len(anchor_vocab) == 256
    assert _rows_by_token(out[name], anchor_vocab, weights[name], shuffled_vocab) == 256
    assert out[name][10].ne(weights[name][10].float()).any()  # rows really moved
    other = "lm_head.weight" if end == "first" else "model.embed_tokens.weight"
    torch.testing.assert_close(out[other], load_file(str(anchor_dir / "model.safetensors"))[
        other].float())
    # the output tokenizer and vocabulary size are the donor's
    assert (out_dir / "tokenizer.json").read_bytes() == (anchor_dir / "tokenizer.json").read_bytes()
    assert json.loads((out_dir / "config.json").read_text())["vocab_size"] == 256
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert model.config.num_hidden_layers == 3
    ids = tokenizer("merge models", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], 256)


def test_slices_with_a_union_tokenizer(workspace, demo_models, tmp_path, shuffled):
    weights, shuffled_vocab = shuffled
    out_dir, out = _stack(workspace, demo_models, tmp_path, "anchor", "shuffled", "union")
    anchor = load_file(str(demo_models["base"] / "model.safetensors"))
    anchor_vocab = vocab_of_tokenizer(json.loads(
        (demo_models["base"] / "tokenizer.json").read_text()))
    out_vocab = vocab_of_tokenizer(json.loads((out_dir / "tokenizer.json").read_text()))
    assert out_vocab == {**anchor_vocab, "<tool>": 256, "<think>": 257}  # donor: the first
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    assert out[embed].shape[0] == out[head].shape[0] == 258
    assert _rows_by_token(out[head], out_vocab, weights[head], shuffled_vocab) == 258
    torch.testing.assert_close(out[embed][:256], anchor[embed].float())
    # tokens the first slice's model lacks: zeros, as mergekit's ZeroEmbedding
    torch.testing.assert_close(out[embed][256:], torch.zeros(2, out[embed].shape[1]))
