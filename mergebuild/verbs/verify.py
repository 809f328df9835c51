"""Audit built models: find one by node or directory, verify its bytes, check it reproduces.

``verify`` needs only the model directory. The reproducibility check (``make --check``)
rebuilds one node from the Mergefile into a scratch directory of the store, never published,
and compares every output file with the stored build.
"""

from __future__ import annotations

import copy
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mergebuild.errors import MergebuildError, StoreError
from mergebuild.provenance.integrity import Problem, verify_directory
from mergebuild.provenance.lineage import iter_lineage, load_lineage
from mergebuild.provenance.statement import (
    read_statement,
    sha256_file,
    short_digest,
    statement_digest,
    subject_files,
)
from mergebuild.store.objects import Store, remove_tree

if TYPE_CHECKING:
    from mergebuild.api import Project, Reporter

SCRATCH_DIR = "scratch"  # <store>/scratch/check.<pid>.<random>/: reproducibility rebuilds


def locate_build(target_or_dir: str, mergefile: str | Path = "Mergefile",
                 cache_dir: str | Path | None = None) -> Path:
    """A built model directory: ``target_or_dir`` itself if it is a directory, else the
    object of that node's current key in the store (the Mergefile is then required).

    Raises:
        StoreError: the node is not built (or its build is stale).
        MergefileError: not a directory, and the Mergefile cannot be read.
    """
    path = Path(target_or_dir)
    if path.is_dir():
        return path
    if not Path(mergefile).exists():
        raise MergebuildError(
            f"'{target_or_dir}' is not a directory, and there is no {mergefile} to find it in",
            hint="pass a built model directory, or -f MERGEFILE with a node name")
    from mergebuild.api import Project

    return Project(mergefile, cache_dir).build_dir(target_or_dir)


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


class _ScratchStore(Store):
    """The project's store, except that builds stay in a scratch directory: nothing is
    published and no ref is written; parents are read from the real objects."""

    def __init__(self, root: Path, scratch: Path):
        super().__init__(root)
        self.tmp = scratch

    def publish(self, tmp_dir: Path, key: str) -> Path:
        return tmp_dir

    def write_ref(self, node: str, record: dict) -> None:
        return None


def check_reproducible(project: Project, node: str, device: str | None = None,
                       reporter: Reporter | None = None) -> ReproReport:
    """Rebuild ``node`` (only it: its parents come from the store) into a scratch directory
    and compare the output digest and every file's sha256 with the stored build.

    The card is compared too (it carries no timestamps); ``provenance.json`` is not, as it
    records when and where the build ran.

    Raises:
        StoreError: ``node`` is not built; build it first.
        MergebuildError: ``node`` is a source.
    """
    states = {s.name: s for s in project.plan([node])}
    state = states[node]
    if state.kind == "source":
        raise MergebuildError("is a source: there is nothing to rebuild", node=node,
                              hint="pass a merge node")
    if state.status != "fresh" or state.path is None or state.key is None:
        why = "; ".join(state.reasons) or "stale"
        raise StoreError(f"not built ({why})", node=node,
                         hint=f"run 'mergebuild make {node}' first")
    stored = read_statement(state.path)
    scratch = project.store.root / SCRATCH_DIR / f"check.{os.getpid()}.{secrets.token_hex(4)}"
    rebuilder = copy.copy(project)
    rebuilder.store = _ScratchStore(project.store.root, scratch)
    try:
        result = rebuilder.make([node], force=True, device=device, reporter=reporter)
        rebuilt_dir = next(r.path for r in result.results if r.name == node)
        assert rebuilt_dir is not None
        rebuilt = read_statement(rebuilt_dir)
    finally:
        remove_tree(scratch)
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


def describe_repro(report: ReproReport) -> list[str]:
    """The lines ``make --check`` prints for one node."""
    if report.ok:
        digest = short_digest(report.stored_digest)
        return [f"{report.node}: reproduced bit for bit ({report.files} files, {digest})"]
    lines = [f"{report.node}: {d}" for d in report.differences]
    if report.stored_digest != report.rebuilt_digest:
        lines.append(f"{report.node}: digest {short_digest(report.rebuilt_digest)} rebuilt, "
                     f"{short_digest(report.stored_digest)} stored")
    lines.append(f"{report.node}: NOT reproduced ({len(report.differences)} of "
                 f"{report.files} files differ)")
    return lines


def scratch_dirs(store: Store) -> list[Path]:
    """Scratch directories of checks whose process is gone (left by a killed check)."""
    root = store.root / SCRATCH_DIR
    if not root.is_dir():
        return []
    dead = []
    for path in sorted(root.iterdir()):
        parts = path.name.split(".")
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        if pid is None or not _alive(pid):
            dead.append(path)
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
