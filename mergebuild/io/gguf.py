"""Hugging Face model directory -> one llama.cpp GGUF file (streamed, published atomically).

Supports the Llama family that llama.cpp's ``convert_hf_to_gguf.py`` handles with the plain
``llama``/``qwen2``/``qwen3``/``gemma``/``gemma2`` graphs: ``LlamaForCausalLM`` and
``MistralForCausalLM`` (both become the ``llama`` architecture, with llama.cpp's Q/K row
permutation), ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``GemmaForCausalLM`` and
``Gemma2ForCausalLM`` (RMSNorm weights stored as ``1 + w``, as llama.cpp expects). Tensor names
come from gguf's own name map. The tokenizer must be a byte-level BPE ``tokenizer.json``
(``tokenizer.ggml.model = gpt2``); SentencePiece tokenizers are refused with a one-line error.

Memory is bounded by the largest tensor: the file layout is planned from the safetensors
headers, then tensors are read (mmap), converted and written one at a time into a temporary file
beside the target, which is fsynced and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from mergebuild.errors import SourceError, StoreError
from mergebuild.io.checkpoint import CheckpointReader

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["QUANTS", "SUPPORTED_ARCHITECTURES", "GgufResult", "Quant", "export_gguf"]

Quant = Literal["f16", "bf16", "q8_0", "q4_0", "f32"]
QUANTS: tuple[str, ...] = get_args(Quant)


@dataclass(frozen=True)
class _Family:
    """How one Hugging Face architecture becomes a llama.cpp one."""

    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's llama graph wants interleaved rotary pairs
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by w
    softcapping: bool = False  # Gemma 2's attention/final logit soft-capping and sliding window


_FAMILIES: dict[str, _Family] = {
    "LlamaForCausalLM": _Family("LLAMA", permute_qk=True),
    "MistralForCausalLM": _Family("LLAMA", permute_qk=True),
    "Qwen2ForCausalLM": _Family("QWEN2"),
    "Qwen3ForCausalLM": _Family("QWEN3"),
    "GemmaForCausalLM": _Family("GEMMA", norm_plus_one=True),
    "Gemma2ForCausalLM": _Family("GEMMA2", norm_plus_one=True, softcapping=True),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_FAMILIES)

# Byte-level BPE pre-tokenizer regexes (as tokenizer.json spells them) -> the
# ``tokenizer.ggml.pre`` name under which llama.cpp re-implements that split.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_PRE_TOKENIZERS: dict[str, str] = {
    _GPT2_SPLIT: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}
# Tensors llama.cpp recomputes itself.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
_SOURCE_DTYPES = ("F32", "F16", "BF16")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class GgufResult:
    """One written GGUF file and what went into it.

    Attributes:
        path: the published file.
        sha256: hex digest of the whole file.
        bytes: file size.
        tensor_count: tensors in the file.
        architecture: llama.cpp architecture written as ``general.architecture``.
        quant: the requested ``quant`` (see `QUANTS`).
        fallbacks: tensors stored as F16 because their row length is not a multiple of the
            quantisation block (llama.cpp's converter does the same).
        gguf_version: version of the ``gguf`` package that encoded (and quantised) the file.
    """

    path: Path
    sha256: str
    bytes: int
    tensor_count: int
    architecture: str
    quant: str
    fallbacks: tuple[str, ...]
    gguf_version: str

    def record(self) -> dict[str, Any]:
        """A JSON-ready summary for an export's provenance (the path is left to the caller)."""
        return {
            "format": "gguf",
            "file": self.path.name,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "tensor_count": self.tensor_count,
            "architecture": self.architecture,
            "quant": self.quant,
            "f16_fallbacks": list(self.fallbacks),
            "gguf_version": self.gguf_version,
        }


@dataclass(frozen=True)
class _Planned:
    """One output tensor: where it comes from, its name, logical (row-major) shape and type."""

    source: str | None  # Hugging Face tensor name; None for generated tensors (rope_freqs)
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int


def export_gguf(
    model_dir: Path,
    out_path: Path,
    quant: Quant = "f16",
    *,
    node: str | None = None,
    name: str | None = None,
) -> GgufResult:
    """Convert the Hugging Face model in `model_dir` into the single GGUF file `out_path`.

    Args:
        model_dir: directory with config.json, tokenizer.json (+ tokenizer_config.json) and
            safetensors weights, as a build or `generate_model` writes it.
        out_path: the file to publish; its directory is created. An existing file is replaced
            only once the new one is complete.
        quant: storage type of 2-D weights: ``f32``, ``f16``, ``bf16``, ``q8_0`` or ``q4_0``.
            1-D tensors (norms, biases) always stay F32. With ``q4_0`` the output projection
            (``output.weight``, or ``token_embd.weight`` when embeddings are tied) is stored as
            Q8_0, since llama.cpp's quantiser also keeps it at higher precision.
        node: node name for error messages.
        name: ``general.name`` written into the file (default: `node`, else the directory name).

    Returns:
        A `GgufResult` with the file's sha256 and size; ``result.record()`` is a small dict
        for an export provenance.

    Raises:
        SourceError: unsupported architecture, tokenizer or tensor; missing config/tokenizer.
        CheckpointError: unreadable weights.
        StoreError: the output cannot be written.
    """
    import gguf
    import numpy as np

    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    model_dir = Path(model_dir)
    out_path = Path(out_path)
    config = _read_json(model_dir / "config.json", node, what="config.json")
    family = _family(config, model_dir, node)
    arch = getattr(gguf.MODEL_ARCH, family.gguf_arch)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    tokenizer = _read_tokenizer(model_dir, node)

    with CheckpointReader(model_dir) as reader:
        plan, fallbacks = _plan(reader, config, family, arch, quant, node)
        writer = gguf.GGUFWriter(path=None, arch=arch_name)
        _write_metadata(writer, config, family, quant, name or node or model_dir.name)
        _write_tokenizer(writer, tokenizer, model_dir, _vocab_size(config, reader), node)
        for item in plan:
            # With raw_dtype given, the numpy dtype only has to be something other than uint8.
            writer.add_tensor_info(
                item.name, item.shape, np.dtype(np.float32), item.nbytes, raw_dtype=item.qtype
            )
        sha256, size = _publish(writer, plan, reader, config, family, out_path, node)

    return GgufResult(
        path=out_path,
        sha256=sha256,
        bytes=size,
        tensor_count=len(plan),
        architecture=arch_name,
        quant=quant,
        fallbacks=tuple(fallbacks),
        gguf_version=metadata.version("gguf"),
    )


# --------------------------------------------------------------------------- inputs


def _read_json(path: Path, node: str | None, *, what: str) -> dict:
    if not path.is_file():
        raise SourceError(
            f"no {what} in {path.parent}; a GGUF export needs it",
            node=node,
            hint="export a complete Hugging Face model directory",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path} is not valid JSON ({exc})", node=node) from None
    if not isinstance(data, dict):
        raise SourceError(f"{path} is not a JSON object", node=node)
    return data


def _family(config: dict, model_dir: Path, node: str | None) -> _Family:
    architectures = config.get("architectures") or [f"<model_type {config.get('model_type')}>"]
    arch = architectures[0]
    family = _FAMILIES.get(arch)
    if family is None:
        raise SourceError(
            f"cannot convert {arch} in {model_dir} to GGUF",
            node=node,
            hint=f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    return family


def _read_tokenizer(model_dir: Path, node: str | None) -> dict:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        spm = " (it has a SentencePiece tokenizer.model, which is not supported)" if (
            model_dir / "tokenizer.model"
        ).is_file() else ""
        raise SourceError(
            f"no tokenizer.json in {model_dir}{spm}; a GGUF file embeds the tokenizer",
            node=node,
            hint="supported: byte-level BPE tokenizer.json (Llama 3, Qwen, GPT-2 style)",
        )
    tokenizer = _read_json(path, node, what="tokenizer.json")
    model = tokenizer.get("model") or {}
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = any(step.get("type") == "ByteLevel" for step in steps)
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_level:
        raise SourceError(
            f"the tokenizer in {model_dir} is not byte-level BPE "
            f"(model {model.get('type')}, byte_fallback {bool(model.get('byte_fallback'))}, "
            f"pre-tokenizer {pre.get('type')})",
            node=node,
            hint="supported: byte-level BPE tokenizer.json (Llama 3, Qwen, GPT-2 style)",
        )
    return tokenizer


def _pre_tokenizer(tokenizer: dict, model_dir: Path, node: str | None) -> str:
    """The llama.cpp pre-tokenizer that splits text as tokenizer.json's pre_tokenizer does."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    other = [s.get("type") for s in steps if s.get("type") not in ("Split", "ByteLevel")]
    if not splits and not other and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"  # ByteLevel's built-in regex is GPT-2's
    pattern = (splits[0].get("pattern") or {}).get("Regex") if len(splits) == 1 else None
    if pattern in _PRE_TOKENIZERS and not other and not byte_level[0].get("use_regex", True):
        return _PRE_TOKENIZERS[pattern]
    raise SourceError(
        f"the pre-tokenizer in {model_dir}/tokenizer.json matches no llama.cpp pre-tokenizer "
        f"({json.dumps(pre)[:120]})",
        node=node,
        hint=f"supported: {', '.join(sorted(set(_PRE_TOKENIZERS.values())))}",
    )


def _vocab_size(config: dict, reader: CheckpointReader) -> int:
    embed = reader.tensors.get("model.embed_tokens.weight")
    return int(config.get("vocab_size") or (embed.shape[0] if embed else 0))


# --------------------------------------------------------------------------- metadata


def _rope_parameters(config: dict) -> dict:
    """Rope settings from transformers ≥5 (``rope_parameters``) or older (``rope_scaling``)."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta") or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _write_metadata(writer: Any, config: dict, family: _Family, quant: str, name: str) -> None:
    import gguf

    heads = int(config["num_attention_heads"])
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
    writer.add_vocab_size(int(config["vocab_size"]))
    if config.get("head_dim"):
        writer.add_key_length(_head_dim(config))
        writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))
    rope = _rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if family.softcapping:
        if config.get("attn_logit_softcapping") is not None:
            writer.add_attn_logit_softcapping(float(config["attn_logit_softcapping"]))
        if config.get("final_logit_softcapping") is not None:
            writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
        if config.get("sliding_window"):
            writer.add_sliding_window(int(config["sliding_window"]))
    file_types = gguf.LlamaFileType
    writer.add_file_type({
        "f32": file_types.ALL_F32, "f16": file_types.MOSTLY_F16, "bf16": file_types.MOSTLY_BF16,
        "q8_0": file_types.MOSTLY_Q8_0, "q4_0": file_types.MOSTLY_Q4_0,
    }[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(
    writer: Any, tokenizer: dict, model_dir: Path, vocab_size: int, node: str | None
) -> None:
    """Tokens, types, merges, special ids, add_bos/eos and chat template (gpt2 tokenizer)."""
    import gguf

    by_id: dict[int, str] = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tokenizer.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        special = added.get("special", False)
        types[added["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise SourceError(
            f"the tokenizer in {model_dir} has token id {max(by_id)} but the model's vocabulary "
            f"has {vocab_size} rows",
            node=node,
            hint="the tokenizer does not belong to these weights",
        )
    tokens: list[str] = []
    token_types: list[int] = []
    for i in range(vocab_size):
        # Embedding rows with no token (vocabularies padded to a multiple of 64…), as llama.cpp.
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        token_types.append(int(types.get(i, gguf.TokenType.UNUSED)))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, model_dir, node))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    # gguf's SpecialVocab reads merges (both tokenizer.json formats), bos/eos/unk/pad ids,
    # add_bos/add_eos and the chat template exactly as llama.cpp's converter does.
    vocab_logger = logging.getLogger("gguf.vocab")
    level = vocab_logger.level
    vocab_logger.setLevel(logging.ERROR)  # it warns about harmless template details on stderr
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    finally:
        vocab_logger.setLevel(level)
    special.add_to_gguf(writer, quiet=True)


# --------------------------------------------------------------------------- tensors


def _plan(
    reader: CheckpointReader, config: dict, family: _Family, arch: Any, quant: str,
    node: str | None,
) -> tuple[list[_Planned], list[str]]:
    """Every output tensor with its name, shape and storage type, from the headers alone."""
    import gguf

    blocks = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(arch, blocks)
    tied = "lm_head.weight" not in reader.tensors or bool(config.get("tie_word_embeddings"))
    output_projection = "token_embd.weight" if tied else "output.weight"
    plan: list[_Planned] = []
    fallbacks: list[str] = []
    seen: dict[str, str] = {}
    for source, info in reader.tensors.items():
        if source.endswith(_SKIPPED_SUFFIXES) or (tied and source == "lm_head.weight"):
            continue  # llama.cpp recomputes rotary tables and reuses token_embd when tied
        target = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise SourceError(
                f"tensor '{source}' has no {gguf.MODEL_ARCH_NAMES[arch]} GGUF name",
                node=node,
                hint="the checkpoint holds tensors this architecture does not use",
            )
        if target in seen:
            raise SourceError(f"tensors '{seen[target]}' and '{source}' both map to '{target}'",
                              node=node)
        seen[target] = source
        if info.dtype not in _SOURCE_DTYPES:
            raise SourceError(
                f"tensor '{source}' is {info.dtype}; GGUF export reads F32, F16 or BF16",
                node=node,
            )
        qtype, fell_back = _storage_type(target, info.shape, quant, output_projection)
        if fell_back:
            fallbacks.append(target)
        plan.append(_planned(source, target, info.shape, qtype))
    rope_freqs = _llama3_rope_factors(config)
    if rope_freqs is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(_planned(None, name, (len(rope_freqs),), gguf.GGMLQuantizationType.F32))
    plan.sort(key=lambda item: _order(item.name))
    return plan, fallbacks


def _order(name: str) -> tuple[int, str]:
    match = re.match(r"blk\.(\d+)\.", name)
    if match:
        return 1 + int(match.group(1)), name
    return (0, name) if name.startswith(("token_embd", "rope_freqs")) else (1 << 30, name)


def _planned(source: str | None, name: str, shape: tuple[int, ...], qtype: Any) -> _Planned:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    nbytes = math.prod(shape[:-1]) * (shape[-1] // block) * type_size
    return _Planned(source, name, tuple(shape), qtype, nbytes)


def _storage_type(
    name: str, shape: tuple[int, ...], quant: str, output_projection: str
) -> tuple[Any, bool]:
    """llama.cpp's rule: 1-D and norm tensors F32; rows that don't fill blocks fall back to F16."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return types.F32, False
    wanted = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16,
              "q8_0": types.Q8_0, "q4_0": types.Q4_0}[quant]
    if quant == "q4_0" and name == output_projection:
        wanted = types.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return types.F16, True
    return wanted, False


def _llama3_rope_factors(config: dict) -> list[float] | None:
    """Llama 3.1's per-frequency rope scaling, which llama.cpp reads as ``rope_freqs.weight``."""
    rope = _rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    dim = _head_dim(config)
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * float(rope["rope_theta"]) ** (i / dim)
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def _permute_qk(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face rotates halves of each head; llama.cpp's llama graph rotates pairs."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _converted(
    item: _Planned, reader: CheckpointReader, config: dict, family: _Family
) -> torch.Tensor:
    """The float32 values llama.cpp expects for one tensor (still in row-major HF layout)."""
    import torch

    if item.source is None:
        return torch.tensor(_llama3_rope_factors(config), dtype=torch.float32)
    values = reader.load(item.source).to(torch.float32)
    if family.permute_qk:
        heads = int(config["num_attention_heads"])
        if item.source.endswith(("q_proj.weight", "q_proj.bias")):
            values = _permute_qk(values, heads)
        elif item.source.endswith(("k_proj.weight", "k_proj.bias")):
            values = _permute_qk(values, int(config.get("num_key_value_heads") or heads))
    if family.norm_plus_one and item.source.endswith("norm.weight"):
        values = values + 1
    return values.contiguous()


def _encoded(values: torch.Tensor, qtype: Any) -> np.ndarray:
    import gguf
    import torch

    types = gguf.GGMLQuantizationType
    if qtype == types.F32:
        return values.numpy()
    if qtype == types.F16:
        return values.to(torch.float16).numpy()
    if qtype == types.BF16:
        # torch rounds to nearest even, as ggml_compute_fp32_to_bf16 does
        return values.to(torch.bfloat16).view(torch.int16).numpy()
    return gguf.quants.quantize(values.numpy(), qtype)


# --------------------------------------------------------------------------- output


def _publish(
    writer: Any,
    plan: list[_Planned],
    reader: CheckpointReader,
    config: dict,
    family: _Family,
    out_path: Path,
    node: str | None,
) -> tuple[str, int]:
    """Stream the tensors into a temp file beside `out_path`, fsync, rename; (sha256, size)."""
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent)
        os.close(fd)
    except OSError as exc:
        raise StoreError(
            f"cannot write beside {out_path}: {exc.strerror or exc}", node=node
        ) from None
    tmp = Path(tmp_name)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for item in plan:
            writer.write_tensor_data(_encoded(_converted(item, reader, config, family), item.qtype))
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        sha256, size = _digest(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an exported model is not
        os.replace(tmp, out_path)
        _fsync_directory(out_path.parent)
    except OSError as exc:
        raise StoreError(
            f"cannot write {out_path}: {exc.strerror or exc}", node=node
        ) from None
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return sha256, size


def _digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
