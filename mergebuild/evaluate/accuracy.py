"""Held-out accuracy: greedy exact match of the answer, or the likeliest of given choices."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mergebuild.errors import EvaluationError
from mergebuild.evaluate.definition import EvalDefinition, Progress
from mergebuild.evaluate.loading import load_model, resolve_device

__all__ = ["AccuracyEval", "Example", "evaluate", "read_examples"]


@dataclass(frozen=True)
class AccuracyEval(EvalDefinition):
    """Exact-match accuracy on a JSONL file of ``{"prompt", "answer"[, "choices"]}`` lines.

    A line without ``choices`` is right when the greedy continuation of ``prompt``, cut at
    the first of `stop` and stripped, equals ``answer`` stripped. A line with ``choices`` is
    right when ``answer`` is the choice with the highest total log-likelihood after ``prompt``.

    Attributes:
        data: the JSONL file.
        max_new_tokens: generation limit per prompt.
        stop: strings that end a generated answer.
        batch_size: prompts per forward pass (no effect on the result, so not in identity).
    """

    data: Path
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    batch_size: int = field(default=32, metadata={"identity": False})

    kind: ClassVar[str] = "accuracy"

    def higher_is_better(self, metric: str) -> bool | None:
        return {"accuracy": True, "n": None}[metric]


@dataclass(frozen=True)
class Example:
    """One line of an accuracy file."""

    prompt: str
    answer: str
    choices: tuple[str, ...] = ()


def read_examples(path: Path) -> list[Example]:
    """The examples of a JSONL file; an `EvaluationError` naming the line when one is malformed."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluationError(f"cannot read {path}: {error}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise EvaluationError(f"{path}:{number}: not a JSON object") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                and isinstance(row.get("answer"), str)):
            raise EvaluationError(f"{path}:{number}: needs string fields 'prompt' and 'answer'")
        choices = row.get("choices", [])
        if not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise EvaluationError(f"{path}:{number}: 'choices' must be a list of strings")
        if choices and row["answer"] not in choices:
            raise EvaluationError(f"{path}:{number}: the answer is not one of the choices")
        examples.append(Example(row["prompt"], row["answer"], tuple(choices)))
    if not examples:
        raise EvaluationError(f"{path}: no examples")
    return examples


def evaluate(model_dir: Path, definition: AccuracyEval, *, device: str = "auto",
             progress: Progress | None = None) -> dict[str, float]:
    """Returns ``{"accuracy": fraction right, "n": number of examples}``."""
    import torch

    examples = read_examples(definition.data)
    device = resolve_device(device)
    model, tokenizer = load_model(model_dir, device)
    generative = [e for e in examples if not e.choices]
    multiple_choice = [e for e in examples if e.choices]
    right, done = 0, 0
    size = max(1, definition.batch_size)
    with torch.inference_mode():
        for start in range(0, len(generative), size):
            batch = generative[start:start + size]
            outputs = _generate(model, tokenizer, [e.prompt for e in batch], definition, device)
            right += sum(out == e.answer.strip() for out, e in zip(outputs, batch))
            done += len(batch)
            if progress:
                progress(done, len(examples))
        for start in range(0, len(multiple_choice), size):
            batch = multiple_choice[start:start + size]
            right += sum(_likeliest(model, tokenizer, e, device) == e.answer for e in batch)
            done += len(batch)
            if progress:
                progress(done, len(examples))
    return {"accuracy": right / len(examples), "n": float(len(examples))}


def _generate(model: Any, tokenizer: Any, prompts: list[str], definition: AccuracyEval,
              device: str) -> list[str]:
    """Greedy continuations, cut at the first stop string and stripped (left-padded batch)."""
    tokenizer.padding_side = "left"
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    generated = model.generate(
        **inputs, max_new_tokens=definition.max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                   skip_special_tokens=True)
    outputs = []
    for text in texts:
        for stop in definition.stop:
            text = text.split(stop, 1)[0]
        outputs.append(text.strip())
    return outputs


def continuation_logprobs(model: Any, tokenizer: Any, context: str, continuations: list[str],
                          device: str) -> list[float]:
    """Total log-probability of each continuation after `context` (one padded forward).

    The context is encoded with special tokens and each continuation without, then joined,
    as lm-evaluation-harness does, so a tokenizer's merge across the seam cannot move tokens
    between the two.
    """
    import torch

    context_ids = tokenizer(context)["input_ids"]
    sequences = [context_ids + tokenizer(c, add_special_tokens=False)["input_ids"]
                 for c in continuations]
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    scores = []
    for row, sequence in enumerate(sequences):
        targets = torch.tensor(sequence[len(context_ids):], device=logprobs.device)
        positions = torch.arange(len(context_ids) - 1, len(sequence) - 1, device=logprobs.device)
        scores.append(float(logprobs[row, positions, targets].sum()))
    return scores


def _likeliest(model: Any, tokenizer: Any, example: Example, device: str) -> str:
    scores = continuation_logprobs(model, tokenizer, example.prompt, list(example.choices), device)
    return example.choices[max(range(len(scores)), key=scores.__getitem__)]
