"""lm-evaluation-harness through its Python API, on a local task, offline."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from mergebuild.errors import EvaluationError
from mergebuild.evaluate.accuracy import read_examples
from mergebuild.evaluate.definition import EvalDefinition, Progress
from mergebuild.evaluate.loading import load_model, resolve_device

__all__ = ["LmEvalTask", "evaluate", "task_yaml"]

_INSTALL_HINT = "pip install 'mergebuild[eval]'"
# Directions of the harness's common metrics; others are unknown (None) unless the harness
# reports them for the task at run time.
_DIRECTIONS = {
    "acc": True, "acc_norm": True, "acc_mutual_info": True, "exact_match": True, "f1": True,
    "mcc": True, "bleu": True, "chrf": True, "ter": False, "rouge1": True, "rouge2": True,
    "rougeL": True, "perplexity": False, "word_perplexity": False, "byte_perplexity": False,
    "bits_per_byte": False,
}


@dataclass(frozen=True)
class LmEvalTask(EvalDefinition):
    """One lm-evaluation-harness task, defined locally so nothing is downloaded.

    Either `data` (a JSONL of ``{"prompt", "answer"[, "choices"]}`` lines, from which a task
    YAML is written: ``multiple_choice`` scored by ``acc`` when lines have choices, else
    ``generate_until`` newline scored by ``exact_match``), or `include_path`, a directory of
    the user's own task YAMLs (their datasets must be local files too).

    Attributes:
        task: the task's name (the one given to the written YAML, or one in include_path).
        num_fewshot: examples prepended from the same split.
        limit: evaluate only the first N documents.
        batch_size: the harness's batch size (no effect on the result, so not in identity).
    """

    task: str = "local"
    data: Path | None = None
    include_path: Path | None = None
    num_fewshot: int = 0
    limit: int | None = None
    batch_size: int = field(default=16, metadata={"identity": False})

    kind: ClassVar[str] = "lm_eval"

    def __post_init__(self) -> None:
        if (self.data is None) == (self.include_path is None):
            raise EvaluationError("an lm_eval evaluation needs exactly one of 'data' (a local "
                                  "JSONL) or 'include_path' (a directory of task YAMLs)")

    def data_files(self) -> dict[str, Path]:
        if self.include_path is None:
            return super().data_files()
        # Every file of the task directory can change the task (YAML, utils.py, data).
        root = self.include_path
        return {f"include_path/{p.relative_to(root)}": p
                for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        # Results move between harness versions (prompt handling, metric code).
        identity["harness"] = _harness_version()
        return identity

    def higher_is_better(self, metric: str) -> bool | None:
        # n (the harness's sample_len) is a count; unknown metrics have no known direction.
        return _DIRECTIONS.get(metric.split(",")[0])


def _harness_version() -> str | None:
    try:
        return metadata.version("lm-eval")
    except metadata.PackageNotFoundError:
        return None


def task_yaml(name: str, data: Path, cache_dir: Path) -> str:
    """The harness task YAML for a local JSONL of prompts, answers and optional choices."""
    import json

    multiple_choice = any(e.choices for e in read_examples(data))
    lines = [
        f"task: {json.dumps(name)}",
        "dataset_path: json",
        "dataset_kwargs:",
        f"  data_files: {{test: {json.dumps(str(data.resolve()))}}}",
        f"  cache_dir: {json.dumps(str(cache_dir))}",
        "test_split: test",
        "fewshot_split: test",
        'doc_to_text: "{{prompt}}"',
        # Prompts carry their own trailing separator; the harness would add a space.
        'target_delimiter: ""',
    ]
    if multiple_choice:
        lines += [
            "output_type: multiple_choice",
            'doc_to_choice: "{{choices}}"',
            'doc_to_target: "{{choices.index(answer)}}"',
            "metric_list:",
            "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        ]
    else:
        lines += [
            "output_type: generate_until",
            'doc_to_target: "{{answer}}"',
            "generation_kwargs: {until: [\"\\n\"], do_sample: false, max_gen_toks: 32}",
            "metric_list:",
            "  - {metric: exact_match, aggregation: mean, higher_is_better: true}",
        ]
    lines.append("metadata: {version: 1}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Forbid the hub for the harness and datasets while the evaluation runs."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def evaluate(model_dir: Path, definition: LmEvalTask, *, device: str = "auto",
             progress: Progress | None = None) -> dict[str, float]:
    """Returns the task's metrics, named as the harness names them without the ``,none`` filter
    suffix (``exact_match``, ``acc``…; ``acc,<filter>`` when a named filter applies), and
    ``n``, the number of documents scored."""
    with _offline(), tempfile.TemporaryDirectory(prefix="mergebuild-lm-eval-") as scratch:
        try:
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise EvaluationError("the lm_eval evaluation needs lm-evaluation-harness",
                                  hint=_INSTALL_HINT) from None
        include = definition.include_path
        if definition.data is not None:
            include = Path(scratch) / "tasks"
            include.mkdir()
            (include / f"{definition.task}.yaml").write_text(
                task_yaml(definition.task, definition.data, Path(scratch) / "datasets"),
                encoding="utf-8")
        device = resolve_device(device)
        model, tokenizer = load_model(model_dir, device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=definition.batch_size,
                  device=device)
        manager = TaskManager(include_path=str(include), include_defaults=False)
        if definition.task not in manager.all_tasks:
            raise EvaluationError(f"lm_eval task '{definition.task}' not found in {include}")
        try:
            output = simple_evaluate(
                model=lm, tasks=[definition.task], task_manager=manager,
                num_fewshot=definition.num_fewshot, limit=definition.limit,
                bootstrap_iters=0, log_samples=False, verbosity="ERROR")
        except Exception as error:  # the harness raises anything; keep one line for the user
            raise EvaluationError(f"lm_eval task '{definition.task}' failed: "
                                  f"{type(error).__name__}: {str(error).splitlines()[0]}"
                                  ) from error
    results = output["results"][definition.task]
    if progress:
        progress(1, 1)
    return {_metric_name(key): float(value) for key, value in results.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
            and "_stderr" not in key}


def _metric_name(key: str) -> str:
    return "n" if key == "sample_len" else key.removesuffix(",none")
