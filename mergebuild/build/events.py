"""What a make tells its user while it runs (the Reporter), and what it returns per node."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.plan.evaluations import CheckOutcome
from mergebuild.plan.selection import Selection
from mergebuild.plan.staleness import NodeState


@dataclass
class NodeResult:
    name: str
    outcome: str  # "built" | "reused" | "fresh" | "failed" | "skipped"
    detail: str = ""
    seconds: float = 0.0
    bytes_written: int = 0
    path: Path | None = None
    checks: list[CheckOutcome] = field(default_factory=list)  # the node's gates, judged

    @property
    def failed_checks(self) -> list[CheckOutcome]:
        return [c for c in self.checks if not c.passed]


@dataclass
class MakeResult:
    results: list[NodeResult]
    seconds: float
    evaluations_run: int = 0  # evaluator runs (each loads a model); 0 for a no-op make

    def count(self, outcome: str) -> int:
        return sum(1 for r in self.results if r.outcome == outcome)

    @property
    def ok(self) -> bool:
        return not any(r.outcome in ("failed", "skipped") for r in self.results)


class Reporter:
    """What a make tells its user; the CLI passes a rich or plain implementation."""

    def plan(self, states: list[NodeState]) -> None: ...
    def node_start(self, state: NodeState, tensors: int | None = None) -> None: ...
    def node_progress(self, name: str, done: int, total: int, bytes_done: int,
                      bytes_total: int) -> None: ...
    def node_done(self, result: NodeResult) -> None: ...
    def waiting(self, name: str) -> None: ...
    def store_busy(self) -> None: ...
    def note(self, message: str) -> None: ...
    def download(self, node: str, label: str, done: int, total: int) -> None: ...
    def summary(self, result: MakeResult) -> None: ...
    def eval_start(self, node: str, eval_name: str) -> None: ...
    def eval_progress(self, node: str, eval_name: str, done: int, total: int) -> None: ...
    def eval_done(self, node: str, eval_name: str, metrics: Mapping[str, float],
                  seconds: float) -> None: ...
    def selected(self, selection: Selection) -> None: ...
    def excluded(self, name: str, group: str, checks: list[CheckOutcome]) -> None: ...
