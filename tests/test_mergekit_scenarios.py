"""mergekit's own test scenarios (its tests/ and examples/) through `mergebuild import` → `make`.

Each scenario asserts what mergekit's test asserts (the output exists, loads without missing or
unexpected keys, has no NaN, has the expected tokenizer) and compares the tensors with mergekit
0.1.5 run in-process on the same config: float32 within 2 ulps or |Δ| ≤ 1e-6; bf16 outputs
against mergekit run with ``dtype: float32, out_dtype: bfloat16`` within 1 bf16 ulp (mergekit's
``dtype`` is its compute dtype; ours is always float32).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergebuild.api import Project
from mergebuild.errors import MergefileError
from mergebuild.spec.mergekit_import import import_mergekit
from mergebuild.spec.parse import load_mergefile

VOCAB = 64
LAYERS = 4


# --- tiny models -----------------------------------------------------------------------------


def _tokenizer(directory: Path, vocab: int, added: list[str]) -> None:
    """A BPE tokenizer of ``vocab`` plain tokens plus ``added`` tokens (mergekit's tests' shape)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab)]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab))),
                                        "merges": []}, "added_tokens": []}
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(data)),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_tokens(added)
    tok.save_pretrained(directory)


def _llama(directory: Path, seed: int, vocab: int = VOCAB, added: list[str] = (),
           base: Path | None = None, layers: int = LAYERS) -> Path:
    """A tiny float32 llama; with ``base``, a fine-tune of it (deltas of a few percent)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                      num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    if base is not None:
        start = {k: v for f in sorted(base.glob("*.safetensors")) for k, v in load_file(f).items()}
        with torch.no_grad():
            for name, p in model.named_parameters():
                src = start[name]
                rows = min(src.shape[0], p.shape[0])
                p[:rows] = src[:rows] + 0.05 * src[:rows].abs().mean() * torch.randn_like(src[:rows])
    model.save_pretrained(directory)
    _tokenizer(directory, VOCAB, list(added))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("picollama")
    base = _llama(root / "model_base", 0)
    out = {"base": base}
    for i, name in enumerate(("a", "b", "c"), start=1):
        out[name] = _llama(root / f"model_{name}", i, base=base)
    out["chatml"] = _llama(root / "model_chatml", 7, vocab=VOCAB + 2,
                           added=["<|im_start|>", "<|im_end|>"], base=base)
    out["padded"] = _llama(root / "model_padded", 8, added=[f"<UNUSED_{i}>" for i in range(4)],
                           base=base)
    return out


# --- running both tools ------------------------------------------------------------------------


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def run_mergekit(config: dict, out: Path) -> Path:
    pytest.importorskip("mergekit.merge", reason="mergekit 0.1.5 is the reference")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(device="cpu", write_model_card=False, random_seed=0, quiet=True))
    return out


def run_mergebuild(config_text: str, root: Path) -> tuple[Path, list[str], Project]:
    """Import the mergekit config verbatim, plan and make it; (output dir, import warnings)."""
    root.mkdir(parents=True, exist_ok=True)
    config_file = root / "merge.yml"
    config_file.write_text(config_text)
    result = import_mergekit([config_file], root)
    mergefile = root / "Mergefile"
    mergefile.write_text(result.text)
    project = Project(mergefile, root / "cache")
    project.plan(["merge"])  # plan accepts what make builds
    project.make(["merge"])
    return project.path("merge"), result.warnings, project


def assert_loads(directory: Path) -> None:
    """mergekit's run_and_check_merge, stricter: the model loads with no key missing or unused."""
    from transformers import AutoModelForCausalLM

    assert (directory / "config.json").is_file()
    for name, t in _tensors(directory).items():
        assert not t.float().isnan().any(), name
    _, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """float32: |Δ| ≤ 1e-6 or 2 ulps; bf16: 1 bf16 ulp (mergekit computed in float32)."""
    assert set(ours) == set(theirs)
    for name in sorted(theirs):
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        x, y = a.double(), b.double()
        scale = torch.maximum(x.abs(), y.abs()).clamp(min=1e-30)
        bits = 23 if a.dtype == torch.float32 else 7
        ulp = torch.exp2(torch.floor(torch.log2(scale)) - bits)
        diff = (x - y).abs()
        if a.dtype == torch.float32:
            ok = (diff <= 1e-6) | (diff <= 2 * ulp)
        else:
            ok = diff <= ulp
        assert bool(ok.all()), (name, float(diff.max()))


def compare(config_text: str, tmp_path: Path, models: dict[str, Path] | None = None,
            expect_warnings: int = 0) -> Path:
    """Build ``config_text`` with both tools and assert the same tensors; our output dir."""
    text = textwrap.dedent(config_text)
    for name, path in (models or {}).items():
        text = text.replace("{" + name + "}", str(path))
    config = yaml.safe_load(text)
    theirs_config = dict(config)
    if config.get("dtype") in ("bfloat16", "float16"):  # mergekit computes in its dtype
        theirs_config["out_dtype"] = config["dtype"]
        theirs_config["dtype"] = "float32"
    theirs = run_mergekit(theirs_config, tmp_path / "mergekit")
    ours, warnings, _ = run_mergebuild(text, tmp_path / "mergebuild")
    assert len(warnings) == expect_warnings, warnings
    assert_same(_tensors(ours), _tensors(theirs))
    assert_loads(ours)
    return ours


# --- item 1: slices with any method ---------------------------------------------------------

LAZY_SLERP = """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_lazymergekit_slerp_template(models, tmp_path):
    out = compare(LAZY_SLERP, tmp_path, models)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == LAYERS


def test_dare_ties_with_slices_and_int8_mask(models, tmp_path):
    # density 1 keeps every element, so DARE's random mask cannot differ between the tools.
    compare("""
        slices:
          - sources:
              - {model: "{base}", layer_range: [0, 4]}
              - {model: "{a}", layer_range: [0, 4], parameters: {weight: 0.6, density: 1.0}}
              - {model: "{b}", layer_range: [0, 4], parameters: {weight: 0.4, density: 1.0}}
        merge_method: dare_ties
        base_model: "{base}"
        parameters: {int8_mask: true}
        dtype: float32
        """, tmp_path, models)


def test_slices_with_different_sources_per_depth(models, tmp_path):
    """Layers 0–1: TIES of A and B; 2–3: TIES of B and C with their own base, parameters."""
    compare("""
        slices:
          - sources:
              - {model: "{base}", layer_range: [0, 2]}
              - {model: "{a}", layer_range: [0, 2], parameters: {weight: 0.7}}
              - {model: "{b}", layer_range: [0, 2], parameters: {weight: 0.3}}
            parameters: {density: 0.5}
          - sources:
              - {model: "{b}", layer_range: [2, 4]}
              - {model: "{c}", layer_range: [2, 4], parameters: {weight: [0.2, 0.8]}}
              - {model: "{a}", layer_range: [2, 4], parameters: {weight: 0.5}}
            base_model: "{b}"
            parameters: {density: 0.7, normalize: false}
            residual_weight: 0.5
        merge_method: ties
        base_model: "{base}"
        parameters: {weight: 1.0, density: 0.9}
        dtype: float32
        """, tmp_path, models, expect_warnings=0)


def test_sliced_linear_stack_of_depth_ranges(models, tmp_path):
    """Two slices of two sources each, from different depths: a merged frankenmerge."""
    compare("""
        slices:
          - sources:
              - {model: "{a}", layer_range: [0, 3], parameters: {weight: 0.25}}
              - {model: "{b}", layer_range: [1, 4], parameters: {weight: 0.75}}
          - sources:
              - {model: "{c}", layer_range: [2, 4], parameters: {weight: [1.0, 0.0]}}
              - {model: "{a}", layer_range: [0, 2], parameters: {weight: 0.5}}
        merge_method: linear
        dtype: float32
        """, tmp_path, models)


def test_yaml_anchors_for_repeated_slices(models, tmp_path):
    out = compare("""
        slices:
          - sources: &early [{model: "{a}", layer_range: [0, 2]}]
          - sources: [{model: "{b}", layer_range: [1, 3]}]
          - sources: *early
        merge_method: passthrough
        dtype: float32
        """, tmp_path, models)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6


def test_a_slice_whose_base_is_not_a_source_is_refused_by_plan(models, tmp_path):
    text = textwrap.dedent("""
        version: 1
        models:
          merge:
            merge_method: ties
            base_model: {base}
            slices:
              - sources:
                  - {{model: {a}, layer_range: [0, 4], parameters: {{weight: 1.0}}}}
        """).format(**models)
    (tmp_path / "Mergefile").write_text(text)
    with pytest.raises(MergefileError, match="base_model .* is not one of its sources"):
        load_mergefile(tmp_path / "Mergefile")


def test_slerp_slices_need_exactly_two_sources_at_plan_time(models, tmp_path):
    text = textwrap.dedent("""
        version: 1
        models:
          merge:
            merge_method: slerp
            base_model: {a}
            parameters: {{t: 0.5}}
            slices:
              - sources:
                  - {{model: {a}, layer_range: [0, 4]}}
                  - {{model: {b}, layer_range: [0, 4]}}
                  - {{model: {c}, layer_range: [0, 4]}}
        """).format(**models)
    (tmp_path / "Mergefile").write_text(text)
    with pytest.raises(MergefileError, match="slice 1: slerp takes exactly 1 model"):
        load_mergefile(tmp_path / "Mergefile")


# --- mergekit's tests/test_basic_merges.py ------------------------------------------------------

TWO_MODELS = """
merge_method: {method}
{base}
models:
  - {{model: "{{a}}", parameters: {{weight: 0.6}}}}
  - {{model: "{{b}}", parameters: {{weight: 0.4}}}}
{params}
dtype: bfloat16
"""

# (method, base, parameters, ignored-parameter warnings): test_basic_merges' two_model_config.
BASIC = {
    "linear": ("linear", None, None, 0),
    "slerp": ("slerp", "a", {"t": 0.35}, 2),
    "nuslerp": ("nuslerp", None, {"nuslerp_row_wise": False, "nuslerp_flatten": True}, 0),
    "nuslerp_row_wise_base": ("nuslerp", "c", {"nuslerp_row_wise": True,
                                               "nuslerp_flatten": False}, 0),
    "task_arithmetic": ("task_arithmetic", "c", None, 0),
    "breadcrumbs": ("breadcrumbs", "c", None, 0),
    "ties": ("ties", "c", {"density": 0.3}, 0),
    "sce": ("sce", "c", {"select_topk": 0.5}, 2),
    "ram": ("ram", "c", None, 2),
    "ramplus_tl": ("ramplus_tl", "c", {"r": 0.05, "alpha": 1.0}, 2),
    "multislerp": ("multislerp", "c", None, 0),
    "model_stock": ("model_stock", "base", None, 2),
    "model_stock_filter_wise": ("model_stock", "base", {"filter_wise": True}, 2),
    "arcee_fusion": ("arcee_fusion", "a", None, 2),
    "nearswap": ("nearswap", "a", {"t": 0.0001}, 2),
}


@pytest.mark.parametrize("case", list(BASIC))
def test_basic_merges(case, models, tmp_path):
    method, base, params, warnings = BASIC[case]
    text = TWO_MODELS.format(method=method, base=f'base_model: "{{{base}}}"' if base else "",
                             params=f"parameters: {json.dumps(params)}" if params else "")
    compare(text, tmp_path, models, expect_warnings=0)
    # mergekit's tests put `weight` on models of methods that ignore it: one warning each.
    _, plan_warnings = _plan_warnings(tmp_path / "mergebuild")
    assert len(plan_warnings) == warnings, plan_warnings
    assert all("does nothing for" in w and "'weight'" in w for w in plan_warnings)


def _plan_warnings(root: Path) -> tuple[Path, tuple[str, ...]]:
    mergefile = load_mergefile(root / "Mergefile")
    return root, mergefile.warnings


@pytest.mark.parametrize("method,params", [
    ("della", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    ("dare_ties", {"density": 0.66}),
    ("karcher", {"max_iter": 5, "tol": 1e-5}),
])
def test_basic_merges_that_build_and_load(method, params, models, tmp_path):
    """Randomised methods (mergekit's one global seed vs our per-tensor seeds) and karcher with
    a base it ignores: mergekit's test asserts the output is complete and has no NaN."""
    text = TWO_MODELS.format(method=method, base='base_model: "{c}"',
                             params=f"parameters: {json.dumps(params)}").replace(
        "{a}", str(models["a"])).replace("{b}", str(models["b"])).replace("{c}", str(models["c"]))
    out, _, _ = run_mergebuild(text, tmp_path)
    assert_loads(out)
    merged = _tensors(out)["model.layers.1.mlp.up_proj.weight"].float()
    a = _tensors(models["a"])["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(merged, a)


def test_della_invalid_epsilon_is_refused_at_plan_time(models, tmp_path):
    text = TWO_MODELS.format(method="della", base='base_model: "{c}"',
                             params='parameters: {"density": 0.66, "epsilon": 1.35}')
    for name in ("a", "b", "c"):
        text = text.replace("{" + name + "}", str(models[name]))
    with pytest.raises(MergefileError, match="epsilon"):
        run_mergebuild(text, tmp_path)


def test_passthrough_scale(models, tmp_path):
    out = compare("""
        merge_method: passthrough
        models:
          - model: "{a}"
            parameters:
              scale: [{filter: o_proj, value: 0}, {value: 1}]
        dtype: float32
        """, tmp_path, models)
    tensors = _tensors(out)
    assert all((t == 0).all() for n, t in tensors.items() if "o_proj" in n)
    assert tensors["lm_head.weight"].count_nonzero() > 0


def test_gpt2_stack(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=3, n_positions=64,
                               vocab_size=VOCAB)).save_pretrained(tmp_path / "gpt2_like")
    slice_ = {"sources": [{"model": str(tmp_path / "gpt2_like"), "layer_range": [0, 3]}]}
    config = {"merge_method": "passthrough", "slices": [slice_, slice_], "dtype": "bfloat16"}
    ours = compare(yaml.safe_dump(config), tmp_path)
    assert json.loads((ours / "config.json").read_text())["n_layer"] == 6


# --- item 2: parameter names ------------------------------------------------------------------


def _node_key(tmp_path: Path, parameters: str) -> tuple[str, tuple[str, ...]]:
    root = tmp_path / f"p{abs(hash(parameters))}"
    root.mkdir()
    (root / "Mergefile").write_text(textwrap.dedent(f"""
        version: 1
        models:
          base: {{source: demo://base}}
          chat: {{source: demo://chat}}
          merge:
            merge_method: slerp
            base_model: base
            models: [{{model: base}}, {{model: chat, parameters: {{weight: 0.5}}}}]
            parameters: {{t: 0.5{parameters}}}
        """))
    project = Project(root / "Mergefile", root / "cache")
    state = {s.name: s for s in project.plan(["merge"])}["merge"]
    return state.key, project.mergefile.warnings


def test_ignored_parameters_warn_once_and_leave_the_key_unchanged(tmp_path):
    plain, warnings = _node_key(tmp_path, "")
    assert len(warnings) == 1 and "'weight' does nothing for slerp" in warnings[0]
    with_mask, warnings = _node_key(tmp_path, ", int8_mask: true")
    assert with_mask == plain
    assert len(warnings) == 2
    mask = next(w for w in warnings if "'int8_mask'" in w)
    assert "does nothing for slerp" in mask and "same result either way" in mask


def test_a_parameter_no_method_knows_is_an_error_with_a_suggestion(tmp_path):
    with pytest.raises(MergefileError, match="unknown parameter 'wieght'") as err:
        _node_key(tmp_path, ", wieght: 0.5")
    assert "did you mean 'weight'" in str(err.value.hint)


def test_the_cli_prints_each_ignored_parameter_once(tmp_path):
    (tmp_path / "Mergefile").write_text(textwrap.dedent("""
        version: 1
        models:
          base: {source: demo://base}
          chat: {source: demo://chat}
          merge:
            merge_method: ties
            base_model: base
            models: [{model: chat, parameters: {weight: 1.0, density: 0.5}}]
            parameters: {int8_mask: true}
        """))
    done = subprocess.run([sys.executable, "-m", "mergebuild.cli", "plan"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(lines) == 1 and "int8_mask" in lines[0], done.stderr


# --- item 3: mergekit's tests/test_tokenizer.py -----------------------------------------------


def _tokenizer_config(models: dict[str, Path], method: str = "linear", names=("base", "padded",
                      "chatml"), **extra) -> str:
    config = {"merge_method": method, "base_model": str(models["base"]),
              "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in names],
              "dtype": "float32", **extra}
    return yaml.safe_dump(config, sort_keys=False)


def _vocab(directory: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory).get_vocab()


def test_tokenizer_source_base(models, tmp_path):
    out = compare(_tokenizer_config(models, tokenizer_source="base"), tmp_path)
    assert len(_vocab(out)) == VOCAB


def test_tokenizer_source_union(models, tmp_path):
    out = compare(_tokenizer_config(models, tokenizer_source="union"), tmp_path)
    vocab = _vocab(out)
    assert len(vocab) == VOCAB + 2 and "<|im_start|>" in vocab
    assert not any(f"<UNUSED_{i}>" in vocab for i in range(4))
    chat_vocab = _vocab(models["chatml"])
    for token in ("<|im_start|>", "<|im_end|>"):  # only model_chatml has them
        ours = _tensors(out)["model.embed_tokens.weight"][vocab[token]]
        theirs = _tensors(models["chatml"])["model.embed_tokens.weight"][chat_vocab[token]]
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)  # the mean of three copies


def test_tokenizer_source_model(models, tmp_path):
    out = compare(_tokenizer_config(models, tokenizer_source=str(models["chatml"])), tmp_path)
    assert "<|im_end|>" in _vocab(out)


def test_slerp_union(models, tmp_path):
    compare(_tokenizer_config(models, method="slerp", names=("base", "chatml"),
                              tokenizer_source="union", parameters={"t": 0.5}),
            tmp_path)


def test_force_token(models, tmp_path):
    tokens = {"_tok_10": {"source": str(models["chatml"]), "force": True},
              "_tok_11": {"source": str(models["base"]), "force": True},
              "<new_tok>": {"source": {"kind": "zero"}}}
    out = compare(_tokenizer_config(models, names=("base", "chatml"),
                                    tokenizer={"source": "union", "tokens": tokens}), tmp_path)
    vocab, embed = _vocab(out), _tensors(out)["model.embed_tokens.weight"]
    assert torch.equal(embed[vocab["_tok_10"]],
                       _tensors(models["chatml"])["model.embed_tokens.weight"][10])
    assert torch.equal(embed[vocab["_tok_11"]],
                       _tensors(models["base"])["model.embed_tokens.weight"][11])
    assert (embed[vocab["<new_tok>"]] == 0).all()


def test_model_token_id(models, tmp_path):
    tokens = {"_tok_20": {"source": {"kind": "model_token", "model": str(models["chatml"]),
                                     "token_id": 64}, "force": True},
              "_tok_21": {"source": {"kind": "model_token", "model": str(models["base"]),
                                     "token": "<s>"}, "force": True}}
    out = compare(_tokenizer_config(models, names=("base", "chatml"),
                                    tokenizer={"source": "base", "tokens": tokens}), tmp_path)
    vocab, embed = _vocab(out), _tensors(out)["model.embed_tokens.weight"]
    assert len(vocab) == VOCAB
    assert torch.equal(embed[vocab["_tok_20"]],
                       _tensors(models["chatml"])["model.embed_tokens.weight"][64])
    assert torch.equal(embed[vocab["_tok_21"]],
                       _tensors(models["base"])["model.embed_tokens.weight"][1])


def test_pad_to_multiple_of(models, tmp_path):
    config = {"merge_method": "linear", "base_model": str(models["chatml"]),
              "models": [{"model": str(models["chatml"]), "parameters": {"weight": 1.0}}],
              "dtype": "float32", "tokenizer": {"source": "base", "pad_to_multiple_of": 16}}
    out = compare(yaml.safe_dump(config), tmp_path)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 80
    assert _tensors(out)["model.embed_tokens.weight"].shape[0] == 80


def test_legacy_mode_refuses_mismatched_vocabularies_with_a_hint(models, tmp_path):
    """mergekit truncates embeddings to the base's rows without a word; mergebuild stops."""
    with pytest.raises(Exception, match="vocabulary mismatch") as err:
        run_mergebuild(_tokenizer_config(models), tmp_path)
    assert "tokenizer_source" in str(getattr(err.value, "hint", "")) + str(err.value)


# --- item 4: mergekit's tests/test_chat_template.py -------------------------------------------


@pytest.mark.parametrize("template,needle", [
    ("chatml", "<|im_start|>"),
    ("{{messages[0]['content']}}", "{{messages[0]['content']}}"),
])
def test_chat_template(template, needle, models, tmp_path):
    config = {"merge_method": "linear", "base_model": str(models["base"]),
              "models": [{"model": str(models[n]), "parameters": {"weight": 0.5}}
                         for n in ("base", "b")],
              "dtype": "bfloat16", "chat_template": template}
    out = compare(yaml.safe_dump(config), tmp_path)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert needle in tokenizer.chat_template
    theirs = AutoTokenizer.from_pretrained(tmp_path / "mergekit")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == theirs.apply_chat_template(
        chat, tokenize=False)


def test_chat_template_auto_takes_the_most_common_parent_template(models, tmp_path):
    from mergebuild.io.chat_templates import LLAMA3

    for name, template in (("a", LLAMA3), ("b", LLAMA3), ("c", "{{ messages[0]['content'] }}")):
        config = json.loads((models[name] / "tokenizer_config.json").read_text())
        (tmp_path / name).mkdir()
        for f in models[name].iterdir():
            (tmp_path / name / f.name).write_bytes(f.read_bytes())
        config["chat_template"] = template
        (tmp_path / name / "tokenizer_config.json").write_text(json.dumps(config))
    config = {"merge_method": "linear", "chat_template": "auto",
              "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0}}
                         for n in ("c", "a", "b")]}
    out, _, _ = run_mergebuild(yaml.safe_dump(config), tmp_path / "build")
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(out).apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_a_chat_template_that_is_neither_a_name_nor_jinja_is_a_plan_error(tmp_path):
    (tmp_path / "Mergefile").write_text(textwrap.dedent("""
        version: 1
        models:
          base: {source: demo://base}
          merge:
            merge_method: linear
            models: [{model: base, parameters: {weight: 1.0}}]
            chat_template: chatm
        """))
    with pytest.raises(MergefileError, match="unknown chat template 'chatm'") as err:
        load_mergefile(tmp_path / "Mergefile")
    assert "did you mean 'chatml'" in str(err.value.hint)


CONVERSATION = [{"role": "system", "content": " Be brief. "},
                {"role": "user", "content": "Hi there "},
                {"role": "assistant", "content": " Hello!"},
                {"role": "user", "content": "2+2?"}]


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca", "mistral", "exaone"])
def test_named_templates_render_as_mergekit_s(name):
    """Same text as mergekit's copies; llama3, alpaca and exaone up to the whitespace mergekit's
    copies add or drop between turns (README: deliberate differences)."""
    import importlib.resources

    from transformers.utils.chat_template_utils import render_jinja_template

    from mergebuild.io.chat_templates import NAMED_TEMPLATES

    pytest.importorskip("mergekit._data.chat_templates")
    from mergekit._data import chat_templates

    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    for conversation in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]):
        for prompt in (False, True):
            rendered = [render_jinja_template(
                conversations=[conversation], chat_template=t, add_generation_prompt=prompt,
                bos_token="<s>", eos_token="</s>")[0][0] for t in (NAMED_TEMPLATES[name], theirs)]
            if name in ("chatml", "mistral"):
                assert rendered[0] == rendered[1]
            else:
                assert rendered[0].split() == rendered[1].split() or (
                    "".join(rendered[0].split()) == "".join(rendered[1].split()))


# --- item 8: modules -------------------------------------------------------------------------


def test_modules_are_refused_in_one_line_by_import_and_plan(tmp_path):
    config = tmp_path / "vlm.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "modules": {"text_decoder": {"models": [{"model": "org/a", "parameters": {"weight": 1}}]}},
    }))
    with pytest.raises(MergefileError, match="modules") as err:
        import_mergekit([config], tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "Mergefile").write_text(textwrap.dedent("""
        version: 1
        models:
          base: {source: demo://base}
          merge:
            merge_method: linear
            modules: {text_decoder: {models: [{model: base}]}}
        """))
    with pytest.raises(MergefileError, match="multi-module merges") as err:
        load_mergefile(tmp_path / "Mergefile")
    assert "models:" in str(err.value.hint)


# --- mergekit's examples/ folder -----------------------------------------------------------------


# mergekit's examples/ (tests do not read another checkout): verbatim copies of the six files.
EXAMPLES = {
    "arcee_fusion": """\
models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
""",
    "bio-merge": """\
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral/BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    "gradient-slerp": """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
# or, the equivalent models: syntax:
# models:
#   - model: psmathur/orca_mini_v3_13b
#   - model: garage-bAInd/Platypus2-13B
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "linear": """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "orcamini-platy-44layer": """\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "ties": """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, models) -> Path:
    """Every model the examples name, as a tiny 40-layer llama at that relative path."""
    root = tmp_path_factory.mktemp("examples")
    base = _llama(root / "TheBloke/Llama-2-13B-fp16", 20, layers=40)
    names = ["psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B",
             "WizardLM/WizardLM-13B-V1.2", "WizardLM/WizardMath-13B-V1.0",
             "mistralai/Mistral-7B-Instruct-v0.2", "BioMistral/BioMistral-7B",
             "mistralai/Mistral-7B-v0.1", "model_a", "model_b"]
    for i, name in enumerate(names, start=21):
        _llama(root / name, i, base=base, layers=40)
    return root


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_every_mergekit_example_imports_and_builds_unedited(example, stand_ins, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(stand_ins)  # relative names resolve to the stand-ins, as paths
    out = compare(EXAMPLES[example], tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == (44 if example == "orcamini-platy-44layer" else 40)


# --- import never writes a Mergefile plan rejects --------------------------------------------------


IMPORT_CASES = {
    "unknown parameter": ("parameters: {t: 0.5, frobnicate: 1}", 1),
    "node-wide parameter on a model": ("", 1),
    "bad chat template": ("chat_template: chatm\nparameters: {t: 0.5}", 1),
    "ignored known parameter": ("parameters: {t: 0.5, int8_mask: true}", 0),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_says_what_it_drops_and_plan_accepts_the_result(case, models, tmp_path):
    extra, dropped = IMPORT_CASES[case]
    entry_params = "{t: 0.5}" if case == "node-wide parameter on a model" else "{}"
    params = "" if extra.startswith("parameters") or "parameters" in extra else \
        "parameters: {t: 0.5}"
    (tmp_path / "merge.yml").write_text(textwrap.dedent(f"""
        merge_method: slerp
        base_model: {models['a']}
        models:
          - {{model: {models['a']}}}
          - {{model: {models['b']}, parameters: {entry_params}}}
        """) + extra + "\n" + params + "\n")
    result = import_mergekit([tmp_path / "merge.yml"], tmp_path)
    assert len(result.warnings) == dropped, result.warnings
    assert all("\n" not in w for w in result.warnings)
    (tmp_path / "Mergefile").write_text(result.text)
    project = Project(tmp_path / "Mergefile", tmp_path / "cache")
    assert [s.name for s in project.plan(["merge"]) if s.name == "merge"] == ["merge"]


def test_bf16_fine_tunes_differ_from_the_base_by_several_ulps(models):
    base = _tensors(models["base"])["model.layers.0.mlp.up_proj.weight"].bfloat16().float()
    tuned = _tensors(models["a"])["model.layers.0.mlp.up_proj.weight"].bfloat16().float()
    ulp = torch.exp2(torch.floor(torch.log2(base.abs().clamp(min=1e-30))) - 7)
    assert float(((tuned - base).abs() / ulp).median()) >= 3
    assert math.isfinite(float(tuned.sum()))


def test_one_model_twice_in_a_slice_merges_its_two_depth_ranges(models, tmp_path):
    """mergekit refuses duplicate inputs; mergebuild merges the two ranges as two models."""
    config = {"merge_method": "linear", "dtype": "float32", "slices": [{"sources": [
        {"model": str(models["a"]), "layer_range": [0, 2], "parameters": {"weight": 0.5}},
        {"model": str(models["a"]), "layer_range": [2, 4], "parameters": {"weight": 0.5}},
    ]}]}
    out, _, _ = run_mergebuild(yaml.safe_dump(config), tmp_path)
    merged, a = _tensors(out), _tensors(models["a"])
    name = "model.layers.{}.self_attn.q_proj.weight"
    expected = (a[name.format(1)] + a[name.format(3)]) / 2
    torch.testing.assert_close(merged[name.format(1)], expected, rtol=0, atol=1e-7)
    assert name.format(2) not in merged
