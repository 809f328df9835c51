"""The single list of evaluation kinds, and dispatch from a definition to its evaluator."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergebuild.errors import EvaluationError
from mergebuild.evaluate.accuracy import AccuracyEval
from mergebuild.evaluate.command import CommandEval
from mergebuild.evaluate.definition import EvalDefinition, Progress
from mergebuild.evaluate.harness import LmEvalTask
from mergebuild.evaluate.perplexity import PerplexityEval

__all__ = ["KINDS", "definition_from_params", "evaluate"]

# kind -> (definition class, module whose `evaluate` runs it; imported when it runs).
KINDS: dict[str, tuple[type[EvalDefinition], str]] = {
    "accuracy": (AccuracyEval, "mergebuild.evaluate.accuracy"),
    "perplexity": (PerplexityEval, "mergebuild.evaluate.perplexity"),
    "lm_eval": (LmEvalTask, "mergebuild.evaluate.harness"),
    "command": (CommandEval, "mergebuild.evaluate.command"),
}


def evaluate(model_dir: Path, definition: EvalDefinition, *, device: str = "auto",
             progress: Progress | None = None) -> dict[str, float]:
    """Run `definition` on the model in `model_dir`; returns {metric: value}."""
    try:
        _, module = KINDS[definition.kind]
    except KeyError:
        raise EvaluationError(f"unknown evaluation kind '{definition.kind}'") from None
    run = importlib.import_module(module).evaluate
    return run(Path(model_dir), definition, device=device, progress=progress)


def definition_from_params(kind: str, params: Mapping[str, Any],
                           base_dir: Path = Path(".")) -> EvalDefinition:
    """A definition from plain values (as a Mergefile gives them): paths are relative to
    `base_dir`, lists become tuples; unknown or missing parameters are an `EvaluationError`.

    Example:
        >>> definition_from_params("accuracy", {"data": "evals/math.jsonl"}).kind
        'accuracy'
    """
    if kind not in KINDS:
        raise EvaluationError(f"unknown evaluation kind '{kind}'",
                              hint=f"one of {', '.join(KINDS)}")
    cls = KINDS[kind][0]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise EvaluationError(f"{kind} evaluation has no parameter(s) {', '.join(unknown)}",
                              hint=f"known: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in params.items():
        hint = hints[name]
        if Path in _types(hint) and isinstance(value, str):
            value = base_dir / value
        elif isinstance(value, list):
            is_paths = any(Path in _types(arg) for arg in typing.get_args(hint))
            value = tuple(base_dir / v if is_paths and isinstance(v, str) else v for v in value)
        values[name] = value
    try:
        return cls(**values)
    except TypeError as error:
        raise EvaluationError(f"{kind} evaluation: {error}") from None


def _types(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) or (hint,)
