"""``make --check``: rebuild one built node into a scratch directory of the store, never
published, and compare every output file with the stored build."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mergebuild.errors import MergebuildError, StoreError
from mergebuild.plan.staleness import NodeState
from mergebuild.provenance.statement import (
    read_statement,
    sha256_file,
    statement_digest,
    subject_files,
)
from mergebuild.store.objects import Store


@dataclass(frozen=True)
class FileDifference:
    """One output file whose rebuilt bytes differ from the stored ones (``None``: absent)."""

    name: str
    stored: str | None  # sha256 hex
    rebuilt: str | None

    def __str__(self) -> str:
        if self.stored is None:
            return f"{self.name}: only in the rebuild"
        if self.rebuilt is None:
            return f"{self.name}: missing from the rebuild"
        return f"{self.name}: sha256 {self.rebuilt[:12]}… rebuilt, {self.stored[:12]}… stored"


@dataclass(frozen=True)
class ReproReport:
    """The outcome of rebuilding one node and comparing it with its stored build."""

    node: str
    key: str
    stored_digest: str
    rebuilt_digest: str
    files: int
    differences: tuple[FileDifference, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.stored_digest == self.rebuilt_digest and not self.differences


def check_reproducible(state: NodeState, store: Store,
                       rebuild: Callable[[Store], Path]) -> ReproReport:
    """Rebuild the planned node ``state`` with ``rebuild(scratch_store)`` (which builds only
    it, its parents coming from the store, and returns the rebuilt directory) and compare
    the output digest and every file's sha256 with the stored build.

    The card is compared too (it carries no timestamps); ``provenance.json`` is not, as it
    records when and where the build ran.

    Raises:
        StoreError: the node is not built; build it first.
        MergebuildError: the node is a source.
    """
    node = state.name
    if state.kind == "source":
        raise MergebuildError("is a source: there is nothing to rebuild", node=node,
                              hint="pass a merge node")
    if state.status != "fresh" or state.path is None or state.key is None:
        why = "; ".join(state.reasons) or "stale"
        raise StoreError(f"not built ({why})", node=node,
                         hint=f"run 'mergebuild make {node}' first")
    stored = read_statement(state.path)
    with store.scratch_store() as scratch:
        rebuilt = read_statement(rebuild(scratch))
    recorded = {name: sha for name, (sha, _size) in subject_files(stored).items()}
    on_disk = {name: _sha256_or_none(state.path / name) for name in recorded}
    new = {name: sha for name, (sha, _size) in subject_files(rebuilt).items()}
    differences = []
    for name in sorted(recorded.keys() | new.keys()):
        # The stored bytes are compared as they are on disk, not only as recorded.
        ours = new.get(name)
        if on_disk.get(name) != ours:
            differences.append(FileDifference(name, on_disk.get(name), ours))
        elif recorded.get(name) != ours:
            differences.append(FileDifference(name, recorded.get(name), ours))
    return ReproReport(node=node, key=state.key, stored_digest=statement_digest(stored),
                       rebuilt_digest=statement_digest(rebuilt), files=len(recorded),
                       differences=tuple(differences))


def _sha256_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None
