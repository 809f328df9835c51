"""A user's command as an evaluation: it gets the model directory and prints one JSON object."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from mergebuild.errors import EvaluationError
from mergebuild.evaluate.definition import EvalDefinition, Progress

__all__ = ["CommandEval", "evaluate"]


@dataclass(frozen=True)
class CommandEval(EvalDefinition):
    """Run `command` (split like a shell would, but run without one) with ``{model}`` replaced
    by the model directory; its stdout must be one JSON object of numeric metrics.

    The device asked for is passed in the environment as ``MERGEBUILD_EVAL_DEVICE``.

    Attributes:
        command: e.g. ``python eval_math.py --model {model}``.
        inputs: files the command reads (its script, its data): their sha256 join the identity,
            so editing them invalidates cached results.
        lower_is_better: metrics where smaller is better (others count as higher-is-better).
        timeout_s: seconds before the command is killed (not in identity).
    """

    command: str
    inputs: tuple[Path, ...] = ()
    lower_is_better: tuple[str, ...] = ()
    timeout_s: float = field(default=3600.0, metadata={"identity": False})

    kind: ClassVar[str] = "command"

    def __post_init__(self) -> None:
        try:
            argv = shlex.split(self.command)
        except ValueError as error:
            raise EvaluationError(f"cannot split command {self.command!r}: {error}") from None
        if not argv:
            raise EvaluationError("the evaluation command is empty")

    def higher_is_better(self, metric: str) -> bool | None:
        return metric not in self.lower_is_better


def evaluate(model_dir: Path, definition: CommandEval, *, device: str = "auto",
             progress: Progress | None = None) -> dict[str, float]:
    """Run the command and return its metrics as floats."""
    argv = [part.replace("{model}", str(model_dir)) for part in shlex.split(definition.command)]
    shown = shlex.join(argv)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=definition.timeout_s,
            env={**os.environ, "MERGEBUILD_EVAL_DEVICE": device}, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise EvaluationError(f"evaluation command not found: {argv[0]}") from None
    except PermissionError:
        raise EvaluationError(f"evaluation command is not executable: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise EvaluationError(f"evaluation command timed out after {definition.timeout_s:g} s: "
                              f"{shown}", hint="raise timeout_s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no stderr"])[-1]
        raise EvaluationError(f"evaluation command exited with status {done.returncode}: "
                              f"{shown}: {last}")
    try:
        metrics = json.loads(done.stdout)
    except ValueError:
        metrics = None
    if not isinstance(metrics, dict):
        raise EvaluationError(f"evaluation command printed no single JSON object: {shown}: "
                              f"{_preview(done.stdout)}", hint="print logs to stderr")
    out = {}
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise EvaluationError(f"evaluation command gave metric '{name}' a value that is not "
                                  f"a finite number: {value!r}")
        out[name] = float(value)
    if progress:
        progress(1, 1)
    return out


def _preview(text: str) -> str:
    text = " ".join(text.split())
    return repr(text[:80] + ("…" if len(text) > 80 else "")) if text else "empty stdout"
