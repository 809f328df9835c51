"""``verify``: re-hash every file of a built model against its statement and walk its chain.

Needs only the model directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergebuild.errors import StoreError
from mergebuild.provenance.integrity import Problem, verify_directory
from mergebuild.provenance.lineage import iter_lineage, load_lineage
from mergebuild.provenance.statement import (
    PROVENANCE_FILE,
    read_statement,
    statement_digest,
    subject_files,
)


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found: every problem, and how much was checked."""

    directory: Path
    problems: tuple[Problem, ...]
    files: int  # file subjects re-hashed
    stages: int  # merge stages in the embedded chain (the model's own included)
    signed_by: str | None = None  # key id whose signature was verified (``--key``)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_build(directory: Path, *, in_store: bool = False,
                 published_digest: str | None = None, public_key: Any = None) -> VerifyReport:
    """Re-hash every file of a built model against its statement and walk the chain.

    ``in_store``: the directory is a store object, whose statement must also state the
    digest the store recorded when it was published (``published_digest``; None: no record),
    so a consistent rewrite of weights and ``provenance.json`` is caught. ``public_key``:
    the directory's DSSE envelope must be signed by it and cover its ``provenance.json``.
    """
    directory = Path(directory)
    problems = list(verify_directory(directory))
    try:
        statement = read_statement(directory)
    except StoreError:
        return VerifyReport(directory, tuple(problems), files=0, stages=0)
    if in_store:
        stated = statement_digest(statement)
        if published_digest is None:
            problems.append(Problem(PROVENANCE_FILE, "not-as-published",
                                    "the store holds no record of publishing this build"))
        elif stated != published_digest:
            problems.append(Problem(PROVENANCE_FILE, "not-as-published",
                                    f"states {stated[:19]}…, the store published "
                                    f"{published_digest[:19]}…"))
    signed_by = None
    if public_key is not None:
        from mergebuild.provenance.signing import SIGNATURE_FILE, check_signature, key_id

        why = check_signature(directory, public_key)
        if why is None:
            signed_by = key_id(public_key)
        else:
            problems.append(Problem(SIGNATURE_FILE, "bad-signature", why))
    stages = sum(1 for n in iter_lineage(load_lineage(directory)) if n.is_build)
    return VerifyReport(directory, tuple(problems), files=len(subject_files(statement)),
                        stages=stages, signed_by=signed_by)
