"""GGUF export: every tensor, value, hyperparameter and tokenizer field, read back by gguf."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from mergebuild.errors import SourceError
from mergebuild.io.checkpoint import CheckpointReader
from mergebuild.io.gguf import QUANTS, export_gguf
from mergebuild.sources.demo import generate_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# The oracle for names: llama.cpp's GGUF names for Hugging Face names, written out by hand.
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GEMMA2_LAYER_NAMES = LAYER_NAMES | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
ARCH_NAMES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma": "gemma", "gemma2": "gemma2",
}
PERMUTED = {"llama", "mistral"}
NORM_PLUS_ONE = {"gemma", "gemma2"}


def gguf_name(hf_name: str, model_type: str) -> str:
    fixed = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in fixed:
        return f"{fixed[stem]}.{suffix}"
    layer, module = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem).groups()
    table = GEMMA2_LAYER_NAMES if model_type == "gemma2" else LAYER_NAMES
    return f"blk.{layer}.{table[module]}.{suffix}"


def unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K permutation: interleaved rotary pairs back to halves."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def tiny_transformers_model(directory: Path, model_type: str, tokenizer_dir: Path,
                            **overrides) -> Path:
    """A 2-layer, hidden-64 model of `model_type` saved by transformers, with the demo tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
        "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": None,
    } | overrides
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(sum(map(ord, model_type)))
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # make every tensor (norms, biases too) distinct from its init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    demo = generate_model(root / "llama", 0, num_layers=2)  # bf16, byte-level BPE tokenizer
    return {
        "llama": demo,
        # intermediate 80: ffn_down rows are not whole Q8_0/Q4_0 blocks -> F16 fallback
        "mistral": tiny_transformers_model(root / "mistral", "mistral", demo,
                                           intermediate_size=80),
        "qwen2": tiny_transformers_model(root / "qwen2", "qwen2", demo, tie_word_embeddings=True),
        "qwen3": tiny_transformers_model(root / "qwen3", "qwen3", demo),
        "gemma": tiny_transformers_model(root / "gemma", "gemma", demo),
        "gemma2": tiny_transformers_model(root / "gemma2", "gemma2", demo),
    }


def source_values(model_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((model_dir / "config.json").read_text())
    with CheckpointReader(model_dir) as reader:
        tensors = {n: reader.load(n).to(torch.float32).clone() for n in reader.tensors}
    return config, tensors


def expected_values(model_type: str, config: dict, name: str, values: torch.Tensor) -> np.ndarray:
    """What llama.cpp expects, computed here independently of the exporter."""
    out = values.numpy()
    heads = config["num_attention_heads"]
    if model_type in PERMUTED and name.endswith(("q_proj.weight", "k_proj.weight")):
        n = heads if "q_proj" in name else config["num_key_value_heads"]
        half = out.shape[0] // n // 2
        out = out.reshape(n, 2, half, -1).transpose(0, 2, 1, 3).reshape(out.shape)
    if model_type in NORM_PLUS_ONE and name.endswith("norm.weight"):
        out = out + np.float32(1)
    return out


def fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


# Per-element bounds of the quantisers, as a fraction of the block's largest |value|:
# Q8_0 stores round(x / d), d = amax/127, so |err| <= d/2 = amax/254; Q4_0 stores
# round(x / d) + 8 clipped to [0, 15], d = amax/8 (signed), so |err| <= d/2 except the one
# clipped value opposite the extreme (-8d rounds to 7d): |err| <= |d| = amax/8. The scale d is
# stored as F16 (relative error <= 2^-11), times |q| <= 127 or 8 codes: + amax * 2^-11 at most.
QUANT_BOUND = {"q8_0": 1 / 254 + 2**-11, "q4_0": 1 / 8 + 2**-11}
MEASURED: dict[str, dict[str, float]] = {}


def check_quantised(name: str, got: np.ndarray, want: np.ndarray, quant: str) -> None:
    blocks_want = want.reshape(-1, 32)
    blocks_err = np.abs(got.reshape(-1, 32) - blocks_want)
    amax = np.abs(blocks_want).max(axis=1, keepdims=True)
    bound = amax * QUANT_BOUND[quant] * (1 + 1e-6)
    assert (blocks_err <= bound).all(), f"{name}: error {blocks_err.max()} over the {quant} bound"
    seen = MEASURED.setdefault(quant, {"max_abs": 0.0, "max_rel_to_block_amax": 0.0})
    seen["max_abs"] = max(seen["max_abs"], float(blocks_err.max()))
    rel = float((blocks_err / np.where(amax == 0, 1, amax)).max())
    seen["max_rel_to_block_amax"] = max(seen["max_rel_to_block_amax"], rel)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_export_reads_back_every_tensor(models, tmp_path, model_type, quant):
    model_dir = models[model_type]
    result = export_gguf(model_dir, tmp_path / "model.gguf", quant, node="final")
    config, source = source_values(model_dir)
    reader = gguf.GGUFReader(result.path)
    tied = "lm_head.weight" not in source or config.get("tie_word_embeddings")
    expected_names = {
        gguf_name(n, model_type) for n in source if not (tied and n == "lm_head.weight")
    }
    assert {t.name for t in reader.tensors} == expected_names
    assert result.tensor_count == len(reader.tensors)
    assert result.architecture == ARCH_NAMES[model_type]
    assert result.bytes == result.path.stat().st_size
    assert list(tmp_path.iterdir()) == [result.path]  # no temp file left beside it

    types = gguf.GGMLQuantizationType
    by_name = {t.name: t for t in reader.tensors}
    fallbacks = set()
    for hf_name, values in source.items():
        if tied and hf_name == "lm_head.weight":
            continue
        tensor = by_name[gguf_name(hf_name, model_type)]
        assert tuple(int(d) for d in tensor.shape) == tuple(reversed(values.shape)), tensor.name
        want = expected_values(model_type, config, hf_name, values)
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        if values.dim() == 1 or quant == "f32":
            assert tensor.tensor_type == types.F32
            np.testing.assert_array_equal(got, want)
        elif quant == "bf16":
            assert tensor.tensor_type == types.BF16
            bf16 = torch.from_numpy(want).to(torch.bfloat16).view(torch.int16).numpy()
            stored = np.asarray(tensor.data).view(np.int16).reshape(bf16.shape)
            np.testing.assert_array_equal(stored, bf16)
        elif quant == "f16" or want.shape[-1] % 32:
            assert tensor.tensor_type == types.F16
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
            if quant != "f16":
                fallbacks.add(tensor.name)
        else:
            output_projection = "token_embd.weight" if tied else "output.weight"
            high_precision = quant == "q8_0" or tensor.name == output_projection
            wanted = types.Q8_0 if high_precision else types.Q4_0
            assert tensor.tensor_type == wanted, tensor.name
            check_quantised(tensor.name, got, want, wanted.name.lower())
    assert set(result.fallbacks) == fallbacks
    assert bool(fallbacks) == (model_type == "mistral" and quant in ("q8_0", "q4_0"))


@pytest.mark.parametrize("model_type", sorted(PERMUTED))
def test_unpermuting_q_and_k_gives_back_the_source(models, tmp_path, model_type):
    result = export_gguf(models[model_type], tmp_path / "m.gguf", "f32")
    config, source = source_values(models[model_type])
    by_name = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    for layer in range(config["num_hidden_layers"]):
        for proj, heads in (("q", config["num_attention_heads"]),
                            ("k", config["num_key_value_heads"])):
            stored = np.asarray(by_name[f"blk.{layer}.attn_{proj}.weight"].data)
            hf = source[f"model.layers.{layer}.self_attn.{proj}_proj.weight"].numpy()
            assert not np.array_equal(stored, hf)  # the permutation did move rows
            np.testing.assert_array_equal(unpermute(stored, heads), hf)


def test_hyperparameters_and_tokenizer_fields(models, tmp_path):
    result = export_gguf(models["llama"], tmp_path / "m.gguf", "q8_0", node="final")
    meta = fields(gguf.GGUFReader(result.path))
    tokenizer = json.loads((models["llama"] / "tokenizer.json").read_text())
    assert {k: meta[k] for k in (
        "general.architecture", "general.name", "general.file_type", "llama.context_length",
        "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
        "llama.attention.head_count", "llama.attention.head_count_kv", "llama.vocab_size",
        "llama.rope.dimension_count", "llama.rope.freq_base",
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
    )} == {
        "general.architecture": "llama", "general.name": "final",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0), "llama.context_length": 2048,
        "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.vocab_size": 256, "llama.rope.dimension_count": 16, "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    vocab = tokenizer["model"]["vocab"]
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    assert meta["tokenizer.ggml.token_type"] == [control] * 3 + [normal] * (len(vocab) - 3)
    assert meta["tokenizer.ggml.merges"] == tokenizer["model"]["merges"]
    assert "tokenizer.chat_template" not in meta  # the demo tokenizer_config has none


def test_chat_template_padding_rows_and_architecture_keys(models, tmp_path):
    model_dir = tmp_path / "qwen3"
    shutil.copytree(models["qwen3"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["vocab_size"] = 260  # embeddings padded past the tokenizer: 4 rows without a token
    with CheckpointReader(models["qwen3"]) as reader:
        tensors = {n: reader.load(n, copy=True) for n in reader.tensors}
    from safetensors.torch import save_file

    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], torch.zeros(4, 64)])
    for old in model_dir.glob("*.safetensors"):
        old.unlink()
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    tokenizer_config["chat_template"] = template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    meta = fields(gguf.GGUFReader(export_gguf(model_dir, tmp_path / "m.gguf").path))
    assert meta["tokenizer.chat_template"] == template
    assert meta["tokenizer.ggml.tokens"][-4:] == [f"[PAD{i}]" for i in range(256, 260)]
    assert meta["tokenizer.ggml.token_type"][-4:] == [int(gguf.TokenType.UNUSED)] * 4
    assert meta["qwen3.vocab_size"] == 260
    assert meta["qwen3.attention.key_length"] == 16
    assert meta["qwen3.rope.freq_base"] == 10000.0


def test_gemma2_softcapping_and_sliding_window(models, tmp_path):
    meta = fields(gguf.GGUFReader(export_gguf(models["gemma2"], tmp_path / "m.gguf").path))
    assert meta["gemma2.attn_logit_softcapping"] == 50.0
    assert meta["gemma2.final_logit_softcapping"] == 30.0
    assert meta["gemma2.attention.sliding_window"] == 4096
    assert meta["gemma2.attention.key_length"] == 16


def test_llama3_rope_scaling_writes_rope_freqs(models, tmp_path):
    model_dir = tmp_path / "llama31"
    shutil.copytree(models["llama"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_scaling"] = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    reader = gguf.GGUFReader(export_gguf(model_dir, tmp_path / "m.gguf").path)
    freqs = next(np.asarray(t.data) for t in reader.tensors if t.name == "rope_freqs.weight")
    # head_dim 16: wavelengths 2π·10000^(i/16); below 64/4 -> 1, above 64/1 -> 8, smooth between
    wavelengths = 2 * np.pi * 10000.0 ** (np.arange(0, 16, 2) / 16)
    smooth = (64 / wavelengths - 1) / 3
    want = np.where(wavelengths < 16, 1.0,
                    np.where(wavelengths > 64, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    np.testing.assert_allclose(freqs, want, rtol=1e-6)
    assert freqs[0] == 1.0 and freqs[-1] == 8.0


def test_export_is_deterministic_and_replaces_atomically(models, tmp_path):
    out = tmp_path / "out" / "model.gguf"
    first = export_gguf(models["llama"], out, "q4_0")
    second = export_gguf(models["llama"], out, "q4_0")
    assert first.sha256 == second.sha256 and first.bytes == second.bytes
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == first.sha256
    assert first.record() == {
        "format": "gguf", "file": "model.gguf", "sha256": first.sha256, "bytes": first.bytes,
        "tensor_count": 21, "architecture": "llama", "quant": "q4_0", "f16_fallbacks": [],
        "gguf_version": gguf_version(),
    }


def gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_unsupported_architecture_is_a_one_line_error(models, tmp_path):
    model_dir = tmp_path / "mamba"
    shutil.copytree(models["llama"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config |= {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError) as error:
        export_gguf(model_dir, tmp_path / "out" / "m.gguf", node="final")
    text = one_line(error)
    assert text.startswith("node 'final': cannot convert MambaForCausalLM")
    assert "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in text
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_is_a_one_line_error(models, tmp_path):
    model_dir = tmp_path / "notok"
    shutil.copytree(models["llama"], model_dir)
    (model_dir / "tokenizer.json").unlink()
    out = tmp_path / "m.gguf"
    with pytest.raises(SourceError) as error:
        export_gguf(model_dir, out, node="final")
    assert "no tokenizer.json" in one_line(error) and "byte-level BPE" in one_line(error)
    assert not out.exists()


def test_non_byte_level_tokenizer_is_refused(models, tmp_path):
    model_dir = tmp_path / "spm"
    shutil.copytree(models["llama"], model_dir)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True
    tokenizer["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(SourceError) as error:
        export_gguf(model_dir, tmp_path / "m.gguf")
    assert "is not byte-level BPE" in one_line(error)


def test_unknown_pre_tokenizer_regex_is_refused(models, tmp_path):
    model_dir = tmp_path / "split"
    shutil.copytree(models["llama"], model_dir)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d+|\w+"}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
    ]}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(SourceError) as error:
        export_gguf(model_dir, tmp_path / "m.gguf")
    assert "matches no llama.cpp pre-tokenizer" in one_line(error)
    assert "supported: gpt-2, llama-bpe, qwen2" in one_line(error)


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.mark.parametrize(("regex", "name"), [(LLAMA3_SPLIT, "llama-bpe"), (QWEN2_SPLIT, "qwen2")])
def test_split_pre_tokenizers_map_to_llama_cpp_names(models, tmp_path, regex, name):
    model_dir = tmp_path / "split"
    shutil.copytree(models["llama"], model_dir)
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False},
    ]}
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    meta = fields(gguf.GGUFReader(export_gguf(model_dir, tmp_path / "m.gguf").path))
    assert meta["tokenizer.ggml.pre"] == name


def test_tokenizer_for_a_different_vocabulary_is_refused(models, tmp_path):
    model_dir = tmp_path / "small"
    generate_model(model_dir, 0, num_layers=1, vocab_size=128)
    shutil.copy(models["llama"] / "tokenizer.json", model_dir / "tokenizer.json")
    with pytest.raises(SourceError) as error:
        export_gguf(model_dir, tmp_path / "m.gguf", node="n")
    assert "has token id 255 but the model's vocabulary has 128 rows" in one_line(error)


def test_quantisation_error_measured(models, tmp_path):
    """Runs after the read-back tests; prints the measured worst case for the report."""
    for quant in ("q8_0", "q4_0"):
        export = export_gguf(models["qwen3"], tmp_path / f"{quant}.gguf", quant)
        _, source = source_values(models["qwen3"])
        by_name = {t.name: t for t in gguf.GGUFReader(export.path).tensors}
        values = source["model.layers.0.mlp.up_proj.weight"].numpy()
        tensor = by_name["blk.0.ffn_up.weight"]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(values.shape)
        check_quantised(tensor.name, got, values, quant)
    print("measured quantisation error:", json.dumps(MEASURED))
    assert MEASURED["q8_0"]["max_rel_to_block_amax"] <= QUANT_BOUND["q8_0"]
    assert MEASURED["q4_0"]["max_rel_to_block_amax"] <= QUANT_BOUND["q4_0"]
    assert MEASURED["q8_0"]["max_rel_to_block_amax"] < MEASURED["q4_0"]["max_rel_to_block_amax"]
