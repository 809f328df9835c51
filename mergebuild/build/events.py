"""What a make tells its user while it runs (the Reporter), and what it returns per node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergebuild.plan.staleness import NodeState


@dataclass
class NodeResult:
    name: str
    outcome: str  # "built" | "reused" | "fresh" | "failed" | "skipped"
    detail: str = ""
    seconds: float = 0.0
    bytes_written: int = 0
    path: Path | None = None


@dataclass
class MakeResult:
    results: list[NodeResult]
    seconds: float

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
    def download(self, node: str, label: str, done: int, total: int) -> None: ...
    def summary(self, result: MakeResult) -> None: ...
