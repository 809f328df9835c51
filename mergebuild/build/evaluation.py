"""Run the evaluations a make needs (each once per model digest and eval definition), store the
results, and judge a node's checks from them."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergebuild.build.events import Reporter
from mergebuild.errors import EvaluationError
from mergebuild.evaluate.definition import EVALUATOR_VERSION
from mergebuild.plan.evaluations import (
    CheckOutcome,
    apply_checks,
    declared_evals,
    eval_digests,
    required_evals,
)
from mergebuild.plan.staleness import NodeState
from mergebuild.spec.graph import Dag
from mergebuild.spec.model import Mergefile
from mergebuild.store.objects import Store
from mergebuild.store.results import ResultStore

__all__ = ["Evaluations", "evaluation_summary", "installed"]

# Kinds that load the model with transformers (a command brings its own tooling).
_NEEDS_TRANSFORMERS = ("accuracy", "perplexity", "lm_eval")


def installed(package: str) -> bool:
    """Whether ``package`` can be imported here (without importing it)."""
    return importlib.util.find_spec(package) is not None


class Evaluations:
    """The evaluations of one make (or one ``mergebuild eval``): what ran, what was cached.

    ``runs`` counts evaluator runs (each loads the model once); a no-op make leaves it at 0.
    """

    def __init__(self, mergefile: Mergefile, graph: Dag, store: Store,
                 reporter: Reporter, device: str | None = None) -> None:
        self.mergefile = mergefile
        self.graph = graph
        self.results = ResultStore(store)
        self.reporter = reporter
        self.device = device or mergefile.defaults.device
        self.digests = eval_digests(mergefile) if mergefile.evals else {}
        self.runs = 0
        self._digest_of: dict[str, str | None] = {}

    def check_installed(self, states: list[NodeState]) -> None:
        """Fail before building anything when a pending evaluation needs a missing package."""
        kinds = {self.mergefile.evals[t.eval].definition.kind
                 for s in states for t in s.evaluations if t.status == "pending"}
        if kinds & set(_NEEDS_TRANSFORMERS) and not installed("transformers"):
            raise EvaluationError("this Mergefile's evals need transformers, which is not "
                                  "installed", hint="pip install 'mergebuild[eval]'")

    def ensure(self, node: str, digest: str, directory: Path | None,
               names: tuple[str, ...] | None = None) -> dict[str, dict[str, float]]:
        """``node``'s results (as model ``digest`` in ``directory``) for ``names`` (default:
        every eval it needs), running those the store does not hold."""
        self._digest_of[node] = digest
        out = {}
        for name in required_evals(self.mergefile, self.graph, node) if names is None else names:
            eval_digest = self.digests[name]
            record = self.results.read(digest, eval_digest, EVALUATOR_VERSION)
            if record is None:
                if directory is None:
                    continue
                record = self._run(node, name, digest, eval_digest, directory)
            self.results.remember(node, digest, name, eval_digest)
            out[name] = {k: float(v) for k, v in record["metrics"].items()}
        return out

    def _run(self, node: str, name: str, digest: str, eval_digest: str, directory: Path
             ) -> dict[str, Any]:
        from mergebuild.evaluate.registry import evaluate

        definition = self.mergefile.evals[name].definition
        self.reporter.eval_start(node, name)
        started = time.monotonic()
        try:
            metrics = evaluate(directory, definition, device=self.device,
                               progress=lambda done, total: self.reporter.eval_progress(
                                   node, name, done, total))
        except EvaluationError as error:
            error.node = error.node or node
            error.message = f"eval '{name}': {error.message}"
            raise
        self.runs += 1
        seconds = time.monotonic() - started
        record = {"model": digest, "eval": name, "eval_digest": eval_digest,
                  "evaluator": EVALUATOR_VERSION, "definition": definition.identity(),
                  "metrics": metrics, "seconds": round(seconds, 3)}
        self.results.write(record)
        self.reporter.eval_done(node, name, metrics, seconds)
        return record

    def scores(self, node: str) -> dict[str, dict[str, float]]:
        """What is known of ``node``'s current model (no evaluation runs)."""
        digest = self._digest_of.get(node)
        if digest is None:
            return {}
        out = {}
        for name in required_evals(self.mergefile, self.graph, node):
            record = self.results.read(digest, self.digests[name], EVALUATOR_VERSION)
            if record is not None:
                out[name] = {k: float(v) for k, v in record["metrics"].items()}
        return out

    def know(self, node: str, digest: str | None) -> None:
        """Record ``node``'s model digest (a node whose scores others' checks read)."""
        if digest is not None:
            self._digest_of.setdefault(node, digest)

    def known(self) -> dict[str, str]:
        """Every node's model digest learned so far (a build elsewhere judges checks that
        read its ancestors' scores with them)."""
        return {node: digest for node, digest in self._digest_of.items() if digest is not None}

    def checks(self, node: str) -> list[CheckOutcome]:
        return apply_checks(self.mergefile, self.graph, node, self.scores)

    def summary(self, node: str, checks: list[CheckOutcome]) -> dict[str, Any] | None:
        """The evaluation part of ``node``'s build record (None when it has no evals)."""
        names = required_evals(self.mergefile, self.graph, node)
        if not names:
            return None
        scores = self.scores(node)
        return evaluation_summary(self.mergefile, node, names, self.digests, scores, checks)


def evaluation_summary(mergefile: Mergefile, node: str, names: tuple[str, ...],
                       digests: Mapping[str, str], scores: Mapping[str, Mapping[str, float]],
                       checks: list[CheckOutcome]) -> dict[str, Any]:
    """Plain JSON of a node's results and verdicts: what the card's model-index and the
    test-result attestation are written from."""
    evals = {}
    for name in names:
        definition = mergefile.evals[name].definition
        identity = definition.identity()
        evals[name] = {
            "digest": "sha256:" + digests[name], "kind": definition.kind,
            "params": identity["params"], "data": identity["data"],
            "declared": name in declared_evals(mergefile, node),
            "metrics": dict(scores.get(name, {})),
            "higher_is_better": {m: definition_direction(definition, m)
                                 for m in scores.get(name, {})},
        }
    return {
        "evaluator": EVALUATOR_VERSION,
        "evals": evals,
        "checks": [{"check": c.describe(), "passed": c.passed} for c in checks],
    }


def definition_direction(definition: Any, metric: str) -> bool | None:
    try:
        return definition.higher_is_better(metric)
    except KeyError:
        return None
