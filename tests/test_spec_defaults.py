"""The Mergefile's ``defaults:``: typed and normalised at parse time, and honoured by builds."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from cli_process import run_cli
from conftest import CHAIN
from safetensors.torch import load_file
from test_build_vocab import _extended_model

from mergebuild.errors import MergefileError
from mergebuild.io.hashing import recipe_key
from mergebuild.methods.registry import METHODS
from mergebuild.plan.recipe import build_recipe
from mergebuild.spec.model import Defaults, TokenizerSpec
from mergebuild.spec.parse import parse_mergefile

HERE = Path("/tmp/project/Mergefile")

NODES = """\
models:
  a: {source: /m/a}
  b: {source: /m/b}
  out:
    merge_method: linear
    models:
      - {model: a, parameters: {weight: 0.5}}
      - {model: b, parameters: {weight: 0.5}}
"""


def parse(defaults: str, nodes: str = NODES):
    return parse_mergefile(f"version: 1\ndefaults:\n{textwrap.indent(defaults, '  ')}{nodes}", HERE)


def key_of(defaults: str, nodes: str = NODES) -> tuple[str, dict]:
    mf = parse(defaults, nodes)
    spec = mf.nodes["out"]
    digests = {"a": "xxh128:a", "b": "xxh128:b", "c": "xxh128:c"}
    recipe = build_recipe(spec, METHODS[spec.method], lambda r: digests[r], mf.defaults)
    return recipe_key(recipe), recipe


@pytest.mark.parametrize(("written", "dtype"), [
    ("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("BF16", "bfloat16"),
    ("fp16", "float16"), ("half", "float16"), ("float16", "float16"),
    ("fp32", "float32"), ("float", "float32"), ("float32", "float32"),
])
def test_dtype_aliases_fold_to_one_name(written, dtype):
    assert parse(f"dtype: {written}\n").defaults.dtype == dtype
    node = NODES + f"    out_dtype: {written}\n"
    assert parse("device: cpu\n", node).nodes["out"].dtype == dtype


def test_dtype_alias_in_defaults_gives_the_same_key():
    key, recipe = key_of("dtype: bf16\n")
    assert recipe["dtype"] == "bfloat16"
    assert key == key_of("dtype: bfloat16\n")[0]
    assert key != key_of("dtype: fp16\n")[0]


def test_unknown_dtype_in_defaults_names_its_line_and_the_valid_values():
    with pytest.raises(MergefileError) as info:
        parse("device: cpu\ndtype: int8\n")
    assert str(info.value).startswith(f"{HERE}:4: unsupported dtype 'int8'")
    assert "float32, float16 or bfloat16" in str(info.value)


def test_defaults_are_typed():
    mf = parse("dtype: half\ndevice: cuda:1\nmax_shard_size: 2GiB\ntokenizer_source: base\n")
    assert mf.defaults == Defaults(dtype="float16", device="cuda:1", max_shard_size=2 * 2**30,
                                   tokenizer=TokenizerSpec(source="base"))
    assert parse("").defaults == Defaults(dtype=None, device="auto", max_shard_size=None,
                                          tokenizer=None)


@pytest.mark.parametrize(("written", "size"), [
    ("5GB", 5 * 1000**3), ("500MB", 500 * 1000**2), ("2GiB", 2 * 1024**3), ("64 KiB", 65536),
    ("1.5GB", 1_500_000_000), ("60000", 60000), ("'60000'", 60000), ("100B", 100),
])
def test_max_shard_size_takes_bytes_or_a_size(written, size):
    assert parse(f"max_shard_size: {written}\n").defaults.max_shard_size == size


def test_max_shard_size_written_as_a_size_keeps_the_key_of_its_bytes():
    assert key_of("max_shard_size: 5GB\n")[0] == key_of("max_shard_size: 5000000000\n")[0]
    assert key_of("max_shard_size: 5GB\n")[1]["shard_size"] == 5_000_000_000


@pytest.mark.parametrize("written", ["-1", "abc", "0", "0.5B", "true", "5 GBs"])
def test_bad_max_shard_size_is_one_line_naming_the_line(written):
    with pytest.raises(MergefileError) as info:
        parse(f"dtype: bfloat16\nmax_shard_size: {written}\n")
    message = str(info.value)
    assert message.startswith(f"{HERE}:4: 'max_shard_size' must be a positive size")
    assert "\n" not in message and "5GB" in message and "GiB" in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps"])
def test_devices_the_engine_knows_pass(device):
    assert parse(f"device: {device}\n").defaults.device == device


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", "3"])
def test_unknown_device_is_rejected(device):
    with pytest.raises(MergefileError, match=r"Mergefile:3: unsupported device .*cuda:N or mps"):
        parse(f"device: {device}\n")


def test_defaults_tokenizer_source_applies_to_nodes_without_their_own():
    nodes = NODES + """\
  own:
    merge_method: linear
    tokenizer_source: union
    models:
      - {model: a, parameters: {weight: 0.5}}
      - {model: b, parameters: {weight: 0.5}}
"""
    mf = parse("tokenizer_source: b\n", nodes)
    assert mf.nodes["out"].tokenizer == TokenizerSpec(source="b")
    assert mf.nodes["out"].tokenizer_source == "b"
    assert mf.nodes["own"].tokenizer == TokenizerSpec(source="union")
    key, recipe = key_of("tokenizer_source: b\n")
    assert recipe["donor"] == "xxh128:b"
    assert recipe["tokenizer"] == {"source": "model", "pad_to_multiple_of": None}
    # the same recipe as the node saying it itself
    assert key == key_of("", NODES + "    tokenizer_source: b\n")[0]


def test_defaults_tokenizer_source_gives_the_key_of_the_same_source_on_the_node():
    assert (key_of("tokenizer_source: base\n")[0]
            == key_of("device: auto\n", NODES + "    tokenizer_source: base\n")[0])
    assert key_of("tokenizer_source: base\n")[0] != key_of("device: auto\n")[0]


def test_defaults_tokenizer_source_naming_a_merge_node_is_not_applied_to_that_node():
    nodes = NODES + """\
  next:
    merge_method: linear
    models:
      - {model: out, parameters: {weight: 0.5}}
      - {model: c, parameters: {weight: 0.5}}
  c: {source: /m/c}
"""
    mf = parse("tokenizer_source: out\n", nodes)
    assert mf.nodes["out"].tokenizer is None
    assert mf.nodes["next"].tokenizer == TokenizerSpec(source="out")


def test_unknown_model_as_defaults_tokenizer_source_suggests_a_node():
    with pytest.raises(MergefileError, match=r"Mergefile:3: unknown model 'bb'.*did you mean 'b'"):
        parse("tokenizer_source: bb\n")


# --- builds ----------------------------------------------------------------------------


def test_dtype_alias_in_defaults_plans_the_same_key_and_builds(workspace):
    workspace.chain()
    keys = {s.name: s.key for s in workspace.project().plan(["base-instruct"])}
    workspace.write(CHAIN.replace("dtype: bfloat16", "dtype: bf16"))
    project = workspace.project()
    assert {s.name: s.key for s in project.plan(["base-instruct"])} == keys
    project.make(["base-instruct"])
    out = project.path("base-instruct")
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {
        torch.bfloat16}
    states = {s.name: s for s in project.plan(["base-instruct"])}
    assert states["base-instruct"].status == "fresh" and states["base-instruct"].key == keys[
        "base-instruct"]


def test_max_shard_size_as_a_size_shards_the_output(workspace):
    workspace.write(CHAIN.replace("  dtype: bfloat16\n",
                                  "  dtype: bfloat16\n  max_shard_size: 100KB\n"))
    project = workspace.project()
    project.make(["chat-code"])
    index = json.loads((project.path("chat-code") / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3


WIDE = """\
version: 1
defaults:
  tokenizer_source: base
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
"""


def test_defaults_tokenizer_source_is_honoured_by_the_build(workspace, demo_models, tmp_path):
    # 'wide' has two more tokens than 'base': without a tokenizer policy this merge fails.
    wide = _extended_model(demo_models["instruct"], tmp_path / "wide")
    workspace.mergefile.write_text(WIDE.format(base=demo_models["base"], wide=tmp_path / "wide"))
    project = workspace.project()
    project.make(["merged"])
    out_dir = project.path("merged")
    out = load_file(str(out_dir / "model.safetensors"))
    base = load_file(str(demo_models["base"] / "model.safetensors"))
    name = "model.embed_tokens.weight"
    assert out[name].shape == base[name].shape
    torch.testing.assert_close(out[name], 0.5 * base[name].float() + 0.5 * wide[name][:256].float())
    assert json.loads((out_dir / "config.json").read_text())["vocab_size"] == 256


@pytest.mark.parametrize(("line", "expect"), [
    ("device: tpu", "Mergefile:3: unsupported device 'tpu'"),
    ("max_shard_size: -1", "Mergefile:3: 'max_shard_size' must be a positive size, got -1"),
    ("max_shard_size: abc", "Mergefile:3: 'max_shard_size' must be a positive size, got 'abc'"),
    ("dtype: int8", "Mergefile:3: unsupported dtype 'int8'"),
])
def test_bad_defaults_fail_the_cli_with_one_line(line, expect, tmp_path):
    (tmp_path / "Mergefile").write_text(f"version: 1\ndefaults:\n  {line}\n{NODES}")
    run = run_cli(["--cache-dir", "store", "make", "out"], cwd=tmp_path)
    assert run.returncode > 0, run.stderr
    assert len(run.error_lines) == 1, run.stderr
    assert run.error_lines[0].startswith("mergebuild: error: ") and expect in run.error_lines[0]
    assert not (tmp_path / "store").exists()
