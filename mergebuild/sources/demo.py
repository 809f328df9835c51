"""Tiny, deterministic Llama-format model directories to merge (no download, no tokenizers lib).

`generate_demo_models` writes a base model and four fine-tunes of it (instruct, chat, code,
math) whose task vectors differ in seed, sparsity and which layers they move most, so every
merge method has something real to do. `generate_model` writes one model with any shape, which
tests use to make incompatible parents. Both are idempotent: a directory whose marker records
the same parameters is left untouched, and a model only appears once it is complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mergebuild.io.checkpoint import CheckpointWriter
from mergebuild.io.dtypes import OUTPUT_DTYPES, dtype_code

if TYPE_CHECKING:
    import torch

__all__ = ["DEMO_MODELS", "MARKER_NAME", "Delta", "generate_demo_models", "generate_model"]

MARKER_NAME = ".mergebuild-demo.json"
# Bump when the bytes generated for the same parameters change, so old directories rebuild.
_FORMAT_VERSION = 1
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_INIT_STD = 0.02


@dataclass(frozen=True)
class Delta:
    """One deterministic fine-tuning delta added to the base weights.

    Attributes:
        seed: seeds the delta's values and sparsity mask.
        density: fraction of elements changed (1.0 = dense; the rest stay bit-identical).
        scale: standard deviation of the change.
        focus_layers: decoder layers changed `focus_gain` times more than the others.
        focus_gain: how much more the focus layers move.
    """

    seed: int
    density: float = 1.0
    scale: float = 0.004
    focus_layers: tuple[int, ...] = ()
    focus_gain: float = 3.0


# The demo family: every fine-tune is base (seed 0) plus its own deltas. chat continues from
# instruct, so their task vectors are correlated; code and math are sparse and local.
DEMO_MODELS: dict[str, tuple[Delta, ...]] = {
    "base": (),
    "instruct": (Delta(seed=1, density=1.0, scale=0.004, focus_layers=(2, 3)),),
    "chat": (
        Delta(seed=1, density=1.0, scale=0.004, focus_layers=(2, 3)),
        Delta(seed=2, density=0.5, scale=0.003, focus_layers=(3,)),
    ),
    "code": (Delta(seed=3, density=0.1, scale=0.012, focus_layers=(0, 1), focus_gain=4.0),),
    "math": (Delta(seed=4, density=0.3, scale=0.006, focus_layers=(1, 2)),),
}


@dataclass(frozen=True)
class DemoAdapter:
    """A deterministic PEFT LoRA for the demo family (rank ``r`` on ``targets``).

    Attributes:
        seed: seeds the A and B matrices.
        r, alpha: rank and ``lora_alpha`` (the delta is B·A·alpha/r).
        targets: module names (``q_proj``…) the adapter changes in every layer.
        scale: standard deviation of A's and B's entries.
    """

    seed: int
    r: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    scale: float = 0.05


# LoRA adapters over the demo family (any of its models: they share shapes).
DEMO_ADAPTERS: dict[str, DemoAdapter] = {
    "style-lora": DemoAdapter(seed=11),
}


@dataclass(frozen=True)
class _Shape:
    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    dtype: str
    max_shard_bytes: int | None = None
    deltas: tuple[Delta, ...] = field(default=())


def generate_demo_models(
    root: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    vocab_size: int = 256,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    dtype: str = "bfloat16",
    max_shard_bytes: int | None = None,
) -> dict[str, Path]:
    """Write (or keep) the demo family ``base``, ``instruct``, ``chat``, ``code``, ``math``.

    Args:
        root: directory that receives one sub-directory per model.
        max_shard_bytes: shard the weights (with an index) when the model is larger.

    Returns:
        {model name: its directory}.

    Example:
        >>> paths = generate_demo_models(Path("models"))
        >>> paths["base"]
        PosixPath('models/base')
    """
    root = Path(root)
    return {
        name: generate_model(
            root / name,
            0,
            deltas=deltas,
            hidden_size=hidden_size,
            num_layers=num_layers,
            vocab_size=vocab_size,
            intermediate_size=intermediate_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
        )
        for name, deltas in DEMO_MODELS.items()
    }


def generate_demo_adapters(
    root: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> dict[str, Path]:
    """Write (or keep) the demo LoRA adapters (``DEMO_ADAPTERS``) for the demo family's shapes.

    Returns:
        {adapter name: its directory (adapter_config.json + adapter_model.safetensors)}.
    """
    kv = num_kv_heads * (hidden_size // num_heads)
    out = {}
    for name, adapter in DEMO_ADAPTERS.items():
        out[name] = directory = Path(root) / name
        marker = {"format": _FORMAT_VERSION, **asdict(adapter), "hidden_size": hidden_size,
                  "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads}
        _generate_once(directory, marker, lambda staging, adapter=adapter: _write_adapter(
            staging, adapter, hidden_size, num_layers, kv))
    return out


def _write_adapter(directory: Path, adapter: DemoAdapter, hidden: int, layers: int,
                   kv: int) -> None:
    import torch
    from safetensors.torch import save_file

    out_features = {"q_proj": hidden, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
    tensors = {}
    for layer in range(layers):
        for target in adapter.targets:
            module = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            g = _generator("lora", adapter.seed, layer, target)
            tensors[f"{module}.lora_A.weight"] = (
                torch.randn(adapter.r, hidden, generator=g) * adapter.scale).contiguous()
            tensors[f"{module}.lora_B.weight"] = (
                torch.randn(out_features[target], adapter.r, generator=g) * adapter.scale
            ).contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    _write_json(directory / "adapter_config.json", {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.r,
        "lora_alpha": adapter.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(adapter.targets), "fan_in_fan_out": False,
        "base_model_name_or_path": None,
    })


def generate_model(
    directory: Path,
    seed: int = 0,
    *,
    deltas: Sequence[Delta] = (),
    hidden_size: int = 64,
    num_layers: int = 4,
    vocab_size: int = 256,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    dtype: str = "bfloat16",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write one Llama-layout Hugging Face model directory: base weights from `seed` + `deltas`.

    Models that share `seed` and shapes share their base weights exactly, so
    ``generate_model(d, 0, deltas=[Delta(7)])`` is a fine-tune of ``generate_model(b, 0)``.
    Changing a shape (``vocab_size=300``, ``num_layers=2``…) makes an incompatible model.

    Returns:
        `directory`, which holds config.json, generation_config.json, tokenizer files and
        safetensors weights (sharded with an index when larger than `max_shard_bytes`).
    """
    directory = Path(directory)
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    if num_heads <= 0 or hidden_size % num_heads:
        raise ValueError("hidden_size must be a multiple of num_heads")
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if vocab_size < len(_SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {len(_SPECIAL_TOKENS) + 1}")
    shape = _Shape(
        hidden_size,
        num_layers,
        vocab_size,
        intermediate_size,
        num_heads,
        num_kv_heads,
        dtype,
        max_shard_bytes,
        tuple(deltas),
    )
    marker = {"format": _FORMAT_VERSION, "seed": seed, **asdict(shape)}
    _generate_once(directory, marker, lambda staging: _write_model(staging, seed, shape))
    return directory


def _generate_once(directory: Path, marker: dict, write: Callable[[Path], None]) -> None:
    """Run ``write`` into a staging dir and publish it as ``directory`` with ``marker``,
    unless ``directory`` already holds what ``marker`` describes."""
    marker = json.loads(json.dumps(marker))  # tuples -> lists, as read back from disk
    if _read_marker(directory) == marker:
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a model directory is not
        write(staging)
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _publish(staging, directory, marker)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- publishing


def _read_marker(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _publish(staging: Path, directory: Path, marker: dict) -> None:
    """Move the finished model into place; a crash never leaves a half-written `directory`."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.rename(directory, old / directory.name)
    try:
        os.rename(staging, directory)
    except OSError:
        # Another process published the same model first; keep theirs if it is what we want.
        if _read_marker(directory) != marker:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _write_model(directory: Path, seed: int, shape: _Shape) -> None:
    import torch

    tensors = _weights(seed, shape)
    dtype = getattr(torch, shape.dtype)
    layout = [(name, dtype_code(shape.dtype), tuple(t.shape)) for name, t in tensors.items()]
    kwargs = {} if shape.max_shard_bytes is None else {"max_shard_bytes": shape.max_shard_bytes}
    writer = CheckpointWriter(directory, layout, **kwargs)
    try:
        for name, values in tensors.items():
            writer.write(name, values.to(dtype))
        writer.finish()
    finally:
        writer.abort()  # no-op after finish()

    _write_json(directory / "config.json", _config(shape))
    _write_json(
        directory / "generation_config.json",
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2},
    )
    _write_json(directory / "tokenizer.json", _tokenizer(shape.vocab_size))
    _write_json(directory / "tokenizer_config.json", _tokenizer_config())
    _write_json(
        directory / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _config(shape: _Shape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": shape.hidden_size // shape.num_heads,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": _INIT_STD,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": shape.dtype,
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


# --------------------------------------------------------------------------- weights


def _tensor_shapes(shape: _Shape) -> dict[str, tuple[int, ...]]:
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = shape.num_kv_heads * (h // shape.num_heads)
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    for layer in range(shape.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return dict(sorted(shapes.items()))


def _generator(*parts: object) -> torch.Generator:
    """A generator seeded by the parts, so each tensor's values ignore generation order."""
    import torch

    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _layer_of(name: str) -> int | None:
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _weights(seed: int, shape: _Shape) -> dict[str, torch.Tensor]:
    """float32 weights in sorted-name order (the order safetensors itself writes)."""
    import torch

    tensors = {}
    for name, dims in _tensor_shapes(shape).items():
        is_norm = name.endswith("norm.weight")
        noise = torch.randn(dims, generator=_generator("base", seed, name))
        values = 1.0 + 0.05 * noise if is_norm else _INIT_STD * noise
        for delta in shape.deltas:
            gain = delta.focus_gain if _layer_of(name) in delta.focus_layers else 1.0
            scale = delta.scale * gain * (0.5 if is_norm else 1.0)
            gen = _generator("delta", delta.seed, name)
            change = scale * torch.randn(dims, generator=gen)
            if delta.density < 1.0:
                change *= torch.rand(dims, generator=gen) < delta.density
            values += change
        tensors[name] = values
    return tensors


# --------------------------------------------------------------------------- tokenizer

# A few lines to learn byte-level BPE merges from; the result is a small but real tokenizer.
_CORPUS = """\
The base model learns the language; the instruct model learns to follow instructions.
A merge combines the weights of several fine-tuned models into one model without training.
Task arithmetic adds task vectors: the difference between a fine-tuned model and its base.
TIES trims small changes, elects a sign for every parameter and averages what agrees.
DARE drops random changes and rescales the rest, so the merged model keeps each skill.
SLERP interpolates along the sphere between two models, keeping the norm of the weights.
def merge(models, weights): return sum(w * m for w, m in zip(models, weights))
for i in range(10): print(i * i + 2 * i + 1)  # 1, 4, 9, 16, 25, 36, 49, 64, 81, 100
Hello, world! How are you today? I am fine, thank you. What is 2 + 2? It is 4.
"""
_WORDS = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, as ByteLevel uses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _tokenizer_vocab(vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """Specials, then byte-level characters by usefulness, then BPE merges learnt on _CORPUS."""
    to_char = byte_to_unicode()
    priority = " \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()[]"
    others = [chr(b) for b in range(32, 127) if chr(b) not in priority]
    alphabet = [to_char[ord(c)] for c in [*priority, *others]]
    vocab: dict[str, int] = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for char in alphabet[: vocab_size - len(vocab)]:
        vocab[char] = len(vocab)

    words = Counter(
        tuple(to_char[b] for b in word.encode("utf-8")) for word in _WORDS.findall(_CORPUS)
    )
    words = Counter({w: n for w, n in words.items() if all(c in vocab for c in w)})
    merges: list[str] = []
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        # Most frequent pair; ties broken by the pair itself so the result is deterministic.
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        vocab.setdefault(merged, len(vocab))
        words = Counter({_apply_merge(w, best, merged): n for w, n in words.items()})
    for extra in range(vocab_size - len(vocab)):
        vocab[f"<unused_{extra}>"] = len(vocab)
    return vocab, merges


def _apply_merge(word: tuple[str, ...], pair: tuple[str, str], merged: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _tokenizer(vocab_size: int) -> dict:
    """A Hugging Face `tokenizers` JSON: byte-level BPE with <unk>, <s>, </s>; prepends <s>."""
    vocab, merges = _tokenizer_vocab(vocab_size)
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, token in enumerate(_SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<s>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "added_tokens_decoder": {
            str(i): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, token in enumerate(_SPECIAL_TOKENS)
        },
    }
