"""The dtype vocabulary: Mergefile names, safetensors codes, byte sizes, torch dtypes (lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARITHMETIC_CODES",
    "DTYPE_NAMES",
    "DTYPE_SIZES",
    "FLOAT_CODES",
    "OUTPUT_DTYPES",
    "dtype_code",
    "dtype_size",
    "normalize_dtype_name",
    "safetensors_code",
    "torch_dtype",
]

# Byte size of every safetensors dtype code we read and write. The key order is the reference
# implementation's dtype order (Rust enum declaration order), which the writer sorts by.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}

# safetensors dtype code -> dtype name (the attribute name on the torch module).
_NAME_OF_CODE: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
}
_CODE_OF_NAME = {name: code for code, name in _NAME_OF_CODE.items()}

# The dtypes a merge may write (Mergefile ``dtype:``), and every spelling a Mergefile accepts.
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
DTYPE_NAMES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}

# Floating-point codes: an output dtype applies to these, other tensors keep their dtype.
FLOAT_CODES = frozenset({"F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2"})
# Codes the engine computes on (in float32) and casts back to; other tensors are copied.
ARITHMETIC_CODES = frozenset({"F32", "F16", "BF16", "F64"})


def normalize_dtype_name(value: str) -> str | None:
    """A Mergefile dtype spelling → its canonical name (``"bf16"`` → ``"bfloat16"``), else None."""
    return DTYPE_NAMES.get(value.lower())


def dtype_size(code: str) -> int:
    """Bytes per element of a safetensors dtype code (``"BF16"`` → 2)."""
    return DTYPE_SIZES[code]


def dtype_code(name: str) -> str:
    """The safetensors code of a dtype name (``"bfloat16"`` → ``"BF16"``)."""
    return _CODE_OF_NAME[name]


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code (``"BF16"`` → ``torch.bfloat16``); imports torch."""
    import torch

    return getattr(torch, _NAME_OF_CODE[code])


def safetensors_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` → ``"BF16"``).

    Raises:
        ValueError: the dtype has no safetensors equivalent.
    """
    try:
        return _CODE_OF_NAME[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no safetensors equivalent") from None
