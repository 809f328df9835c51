"""Token-level perplexity of a text file, scored in overlapping windows with a stride."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mergebuild.errors import EvaluationError
from mergebuild.evaluate.definition import EvalDefinition, Progress
from mergebuild.evaluate.loading import load_model, resolve_device

__all__ = ["PerplexityEval", "evaluate", "windows"]


@dataclass(frozen=True)
class PerplexityEval(EvalDefinition):
    """Perplexity of a UTF-8 text file, tokenized whole (with the tokenizer's BOS).

    Windows of `window` tokens start every `stride` tokens; each scores only the tokens the
    previous window did not, so every token after the first is scored once, with up to
    ``window - stride`` tokens of context (Hugging Face's "perplexity of fixed-length models").

    Attributes:
        data: the text file.
        window: tokens per forward pass (at most the model's context length).
        stride: tokens between window starts (1..window).
        batch_size: windows per forward pass (no effect on the result, so not in identity).
    """

    data: Path
    window: int = 256
    stride: int = 128
    batch_size: int = field(default=8, metadata={"identity": False})

    kind: ClassVar[str] = "perplexity"

    def __post_init__(self) -> None:
        if self.window < 2 or not 1 <= self.stride <= self.window:
            raise EvaluationError(f"perplexity needs window >= 2 and 1 <= stride <= window, "
                                  f"got window={self.window} stride={self.stride}")

    def higher_is_better(self, metric: str) -> bool | None:
        return {"perplexity": False, "tokens": None}[metric]


def windows(length: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over `length` tokens.

    Position p is scored as the prediction of token p from tokens before it, so position 0
    (the BOS) is never scored.
    """
    spans, scored_to = [], 1
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        if end > scored_to:
            spans.append((begin, end, max(scored_to, begin + 1)))
            scored_to = end
        if end == length:
            break
    return spans


def evaluate(model_dir: Path, definition: PerplexityEval, *, device: str = "auto",
             progress: Progress | None = None) -> dict[str, float]:
    """Returns ``{"perplexity": exp(mean token NLL), "tokens": number of tokens scored}``."""
    import torch

    try:
        text = definition.data.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluationError(f"cannot read {definition.data}: {error}") from None
    device = resolve_device(device)
    model, tokenizer = load_model(model_dir, device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and definition.window > limit:
        raise EvaluationError(f"window {definition.window} exceeds the model's context "
                              f"length {limit}", hint="lower the perplexity window")
    # verbose=False: a text longer than the model's context is the point of striding.
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    spans = windows(len(ids), definition.window, definition.stride)
    if not spans:
        raise EvaluationError(f"{definition.data}: too short to score (needs two tokens)")
    total, count, done = 0.0, 0, 0
    with torch.inference_mode():
        for batch in _batches(spans, definition.batch_size):
            tokens = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)
            nll = _token_nll(model, tokens)
            for row, (begin, _, first) in enumerate(batch):
                scored = nll[row, first - begin - 1:]
                total += float(scored.double().sum())
                count += scored.numel()
            done += len(batch)
            if progress:
                progress(done, len(spans))
    return {"perplexity": math.exp(total / count), "tokens": float(count)}


def _token_nll(model: Any, tokens: Any) -> Any:
    """NLL of tokens[:, 1:] given the tokens before each (float32)."""
    import torch

    logits = model(input_ids=tokens).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), tokens[:, 1:], reduction="none")


def _batches(spans: list[tuple[int, int, int]], size: int) -> list[list[tuple[int, int, int]]]:
    """Runs of at most `size` windows of one length (only the last window can be shorter)."""
    out: list[list[tuple[int, int, int]]] = []
    for span in spans:
        previous = out[-1] if out else None
        if (previous and len(previous) < max(1, size)
                and previous[0][1] - previous[0][0] == span[1] - span[0]):
            out[-1].append(span)
        else:
            out.append([span])
    return out
