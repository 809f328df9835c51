"""Check a model directory's bytes against its provenance, and the embedded chain's consistency."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mergebuild.errors import StoreError
from mergebuild.io.json_limits import RECORD_MAX_BYTES, read_json_bounded
from mergebuild.provenance.statement import (
    ADDED_EVALUATION_FILE,
    CARD_ATTESTATION_FILE,
    CARD_FILE,
    CARD_PREDICATE_TYPE,
    DESCRIPTIVE_FILES,
    PROVENANCE_FILE,
    digest_set,
    digest_string,
    digests_match,
    dir_hash,
    directory_digest,
    flatten_statement,
    read_statement,
    sha256_file,
    short_digest,
    statement_digest,
    statement_id,
    statement_problems,
    subject_files,
)

__all__ = ["PROBLEM_KINDS", "Problem", "chain_problems", "quick_check", "verify_directory"]

PROBLEM_KINDS = ("missing", "modified", "truncated", "unexpected", "invalid-provenance",
                 "not-as-published", "bad-signature")
SIGNATURE_FILE = "provenance.dsse.json"  # a DSSE envelope over provenance.json (signing.py)


@dataclass(frozen=True)
class Problem:
    """One integrity problem found in a model directory.

    ``path`` is relative to the directory (``provenance.json#a/b`` for a problem inside
    the embedded chain); ``kind`` is one of :data:`PROBLEM_KINDS`.
    """

    path: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: {self.detail}"


def verify_directory(directory: Path) -> list[Problem]:
    """Re-hash every file against the provenance subjects and check the embedded chain.

    Returns every problem found (empty when the directory is intact): a subject file that
    is ``missing``, shorter than recorded (``truncated``), of other size or content
    (``modified``), a file no subject names (``unexpected``; dot-files are ignored), and
    ``invalid-provenance`` for a statement or embedded chain that does not hold together.
    """
    return _check(Path(directory), rehash=True)


def quick_check(directory: Path) -> list[Problem]:
    """The cheap check before reusing a store object: files exist with their sizes.

    No file is read except ``provenance.json``.
    """
    return _check(Path(directory), rehash=False)


def _check(directory: Path, *, rehash: bool) -> list[Problem]:
    if not (directory / PROVENANCE_FILE).is_file():
        return [Problem(PROVENANCE_FILE, "missing", f"no {PROVENANCE_FILE} in {directory}")]
    try:
        statement = read_statement(directory, upstream=rehash)
    except StoreError as exc:
        return [Problem(PROVENANCE_FILE, "invalid-provenance", exc.message)]
    expected = subject_files(statement)
    problems: list[Problem] = []
    card = _card_attestation(directory, statement)
    if isinstance(card, Problem):
        problems.append(card)
    elif card is not None:  # the presented card replaces the build's own
        expected[CARD_FILE] = card
    problems += _added_evaluation_problems(directory, expected)
    for name, (sha256, size) in sorted(expected.items()):
        if not _safe_name(name):
            problems.append(
                Problem(name, "invalid-provenance", "subject name escapes the directory")
            )
            continue
        problems += _check_file(directory / name, name, sha256, size, rehash=rehash)
    problems += _unexpected_files(directory, set(expected))
    if rehash:
        problems += chain_problems(statement)
    return problems


def _card_attestation(directory: Path, statement: Mapping[str, Any]
                      ) -> tuple[str, int | None] | Problem | None:
    """The card's (sha256, size) from ``card.json`` when a presented card replaces the
    build's own; a Problem when that attestation is not for this build."""
    path = directory / CARD_ATTESTATION_FILE
    if not path.is_file():
        return None
    try:
        attestation = read_json_bounded(path, RECORD_MAX_BYTES)
        assert attestation["predicateType"] == CARD_PREDICATE_TYPE
        (subject,) = attestation["subject"]
        assert subject["name"] == CARD_FILE
        sha256, size = str(subject["digest"]["sha256"]), subject["annotations"]["size"]
        build = str(attestation["predicate"]["build"]["digest"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AssertionError):
        return Problem(CARD_ATTESTATION_FILE, "invalid-provenance",
                       "not a mergebuild card attestation")
    if build != statement_digest(statement):
        return Problem(CARD_ATTESTATION_FILE, "invalid-provenance",
                       f"attests a card of build {short_digest(build)}, this is "
                       f"{short_digest(statement_digest(statement))}")
    return sha256, size if isinstance(size, int) else None


def _added_evaluation_problems(directory: Path, expected: Mapping[str, tuple[str, int | None]]
                               ) -> list[Problem]:
    """An attestation of evals run after the build must be about this build's files: each
    of its subjects is a file the provenance lists, with the same sha256."""
    path = directory / ADDED_EVALUATION_FILE
    if not path.is_file():
        return []
    try:
        subjects = read_json_bounded(path, RECORD_MAX_BYTES)["subject"]
        named = {str(s["name"]): str(s["digest"]["sha256"]).lower() for s in subjects}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return [Problem(ADDED_EVALUATION_FILE, "invalid-provenance",
                        "not an evaluation attestation")]
    wrong = sorted(n for n, sha in named.items()
                   if n not in expected or expected[n][0].lower() != sha)
    if not named or wrong:
        return [Problem(ADDED_EVALUATION_FILE, "invalid-provenance",
                        f"attests files this build does not have: {', '.join(wrong) or 'none'}")]
    return []


def _safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return (
        bool(name)
        and "\\" not in name
        and not path.is_absolute()
        and ".." not in path.parts
        and name != PROVENANCE_FILE
    )


def _check_file(
    path: Path, name: str, sha256: str, size: int | None, *, rehash: bool
) -> list[Problem]:
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        return [Problem(name, "missing", "listed in provenance but not present")]
    if not path.is_file():
        return [Problem(name, "missing", "listed in provenance but not a regular file")]
    if size is not None and actual_size < size:
        return [Problem(name, "truncated", f"{actual_size} bytes, expected {size}")]
    if size is not None and actual_size > size:
        return [Problem(name, "modified", f"{actual_size} bytes, expected {size}")]
    if rehash:
        actual = sha256_file(path)
        if actual != sha256.lower():
            return [Problem(name, "modified", f"sha256 {actual[:12]}…, expected {sha256[:12]}…")]
    return []


def _unexpected_files(directory: Path, expected: set[str]) -> list[Problem]:
    problems = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for filename in sorted(files):
            if filename.startswith("."):
                continue
            rel = (Path(root) / filename).relative_to(directory).as_posix()
            if rel not in expected and rel not in (PROVENANCE_FILE, CARD_ATTESTATION_FILE,
                                                   SIGNATURE_FILE, ADDED_EVALUATION_FILE):
                problems.append(Problem(rel, "unexpected", "not listed in provenance"))
    return problems


def chain_problems(statement: Mapping[str, Any], where: str = "") -> list[Problem]:
    """Internal consistency of a statement and every upstream statement embedded in it.

    Checks that each directory subject agrees with its build digest and with its file
    subjects, that each embedded statement is filed under its own id, and that each one
    describes exactly the digest its dependency entry names. Iterative: each embedded
    statement is checked once, however deep the chain.
    """
    try:
        root, upstream = flatten_statement(statement)
    except (AttributeError, TypeError, ValueError) as exc:
        return [Problem(PROVENANCE_FILE, "invalid-provenance", f"unreadable chain: {exc}")]
    problems: list[Problem] = []
    for sid, embedded in upstream.items():
        if statement_id(embedded) != sid:
            problems.append(Problem(f"{PROVENANCE_FILE}#{sid[:19]}", "invalid-provenance",
                                    "embedded statement does not match its id"))
    checked: set[str] = set()
    pending: list[tuple[Mapping[str, Any], str]] = [(root, where)]
    while pending:
        current, at = pending.pop()
        definition = current["predicate"]["buildDefinition"]
        node = str(definition.get("externalParameters", {}).get("node", "?"))
        chain = f"{at}/{node}" if at else node
        path = f"{PROVENANCE_FILE}#{chain}"
        problems += _own_problems(current, definition, path)
        for dep in definition.get("resolvedDependencies", []):
            sid = (dep.get("annotations") or {}).get("statementDigest")
            if sid is None:
                continue
            dep_path = f"{path}/{dep.get('name', '?')}"
            embedded = upstream.get(str(sid))
            if embedded is None:
                problems.append(Problem(dep_path, "invalid-provenance",
                                        f"embedded statement {str(sid)[:19]} is missing"))
                continue
            structural = statement_problems(embedded)
            if structural:
                problems.append(Problem(dep_path, "invalid-provenance", structural[0]))
                continue
            upstream_digest = directory_digest(embedded)
            wanted = {k: v for k, v in (dep.get("digest") or {}).items() if k != "gitCommit"}
            if not digests_match(upstream_digest, wanted):
                problems.append(
                    Problem(
                        dep_path,
                        "invalid-provenance",
                        f"embedded statement describes {_show(upstream_digest)}, "
                        f"dependency names {_show(wanted)}",
                    )
                )
            if sid not in checked:
                checked.add(str(sid))
                pending.append((embedded, chain))
    return problems


def _own_problems(statement: Mapping[str, Any], definition: Mapping[str, Any],
                  path: str) -> list[Problem]:
    """A statement's directory subject against its build digest and its file subjects."""
    own = directory_digest(statement)
    if not own:
        return [Problem(path, "invalid-provenance", "no whole-directory subject")]
    problems = []
    recorded = definition.get("internalParameters", {}).get("digest")
    try:
        if recorded is not None and not digests_match(own, digest_set(str(recorded))):
            problems.append(
                Problem(path, "invalid-provenance", f"directory digest is not {recorded}")
            )
    except ValueError as exc:
        problems.append(Problem(path, "invalid-provenance", str(exc)))
    outputs = {n: sha for n, (sha, _) in subject_files(statement).items()
               if n not in DESCRIPTIVE_FILES}
    if "dirHash" in own and own["dirHash"] != dir_hash(outputs):
        problems.append(
            Problem(path, "invalid-provenance", "dirHash does not match the file subjects")
        )
    return problems


def _show(digests: Mapping[str, str]) -> str:
    plain = {k: v for k, v in digests.items() if k != "dirHash"}
    return short_digest(digest_string(plain)) if plain else "no digest"
