"""Load a model directory for evaluation: transformers model and tokenizer on the chosen device."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.errors import EvaluationError

if TYPE_CHECKING:
    import torch

__all__ = ["load_model", "resolve_device"]

_INSTALL_HINT = "pip install 'mergebuild[eval]'"


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is usable, else ``cpu``; other names pass through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"device '{device}' asked for, but torch sees no CUDA GPU",
                              hint="use device 'auto' or 'cpu'")
    return device


def eval_dtype(device: str) -> Any:
    """float32 on CPU (exact and not slower there); the checkpoint's own dtype on a GPU."""
    import torch

    return torch.float32 if device == "cpu" else "auto"


def load_model(model_dir: Path, device: str) -> tuple[torch.nn.Module, Any]:
    """(causal LM in eval mode on `device`, its tokenizer with a pad token set)."""
    try:
        import transformers
    except ImportError:
        raise EvaluationError("evaluating a model needs transformers",
                              hint=_INSTALL_HINT) from None
    # One model directory loads in milliseconds here; its per-tensor bar would only be noise.
    transformers.utils.logging.disable_progress_bar()
    # transformers 4.56 renamed torch_dtype to dtype; both spellings reach the same option.
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if version >= (4, 56) else "torch_dtype"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, **{dtype_key: eval_dtype(device)})
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"cannot load {model_dir} for evaluation: "
                              f"{str(error).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        # Padding is masked out; any id works, and eos exists in every causal LM tokenizer.
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
