"""``verify``: re-hash every file of a built model against its statement and walk its chain.

Needs only the model directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergebuild.errors import StoreError
from mergebuild.provenance.integrity import Problem, verify_directory
from mergebuild.provenance.lineage import iter_lineage, load_lineage
from mergebuild.provenance.statement import read_statement, subject_files


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found: every problem, and how much was checked."""

    directory: Path
    problems: tuple[Problem, ...]
    files: int  # file subjects re-hashed
    stages: int  # merge stages in the embedded chain (the model's own included)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_build(directory: Path) -> VerifyReport:
    """Re-hash every file of a built model against its statement and walk the chain."""
    directory = Path(directory)
    problems = tuple(verify_directory(directory))
    try:
        statement = read_statement(directory)
    except StoreError:
        return VerifyReport(directory, problems, files=0, stages=0)
    stages = sum(1 for n in iter_lineage(load_lineage(directory)) if n.is_build)
    return VerifyReport(directory, problems, files=len(subject_files(statement)), stages=stages)
