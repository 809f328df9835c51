"""Evaluations of a model directory: held-out accuracy, perplexity, lm-evaluation-harness, commands.

Each kind is one module with a frozen definition dataclass and an ``evaluate`` function;
`registry` is the single list of kinds. Heavy packages (torch, transformers, lm_eval) are
imported only when an evaluation runs.
"""

from mergebuild.evaluate.definition import EVALUATOR_VERSION, EvalDefinition
from mergebuild.evaluate.registry import KINDS, definition_from_params, evaluate

__all__ = ["EVALUATOR_VERSION", "KINDS", "EvalDefinition", "definition_from_params", "evaluate"]
