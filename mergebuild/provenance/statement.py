"""Turn a build record into an in-toto Statement v1 with an SLSA Provenance v1 predicate.

The statement written as ``provenance.json`` beside every built model says what went in
(every parent with its digest, hub commit, per-file digests and, for upstream nodes, their
own statement embedded), what was done (the node as written and its canonical recipe), by
what (tool versions, device) and when. Timestamps and the invocation id live only here;
they never enter a key.

Layout of one statement (names are ours where the spec leaves them open)::

    _type          https://in-toto.io/Statement/v1
    subject[]      one per file: {name, digest: {sha256}, annotations: {size}}
                   plus one directory subject, name ".":
                   {digest: {sha256: <content digest>, dirHash: <over the outputs>},
                    annotations: {kind: "directory", files, size}}
    predicateType  https://slsa.dev/provenance/v1
    predicate.buildDefinition
        buildType            https://mergebuild.dev/buildtypes/merge/v<ENGINE_VERSION>
        externalParameters   {node, method, spec, mergefile_digest}
        internalParameters   {key, digest, engine_version, device, recipe,
                              upstreamStatements: {<statement id>: <statement>}}
        resolvedDependencies [{name, uri, digest, annotations: {kind, role, revision,
                               commit, files, method, statementDigest, adapter}}]
                             a merge read through a LoRA ("merge+lora") is two entries: the
                             upstream node (its built digest, statement, and "adapter": the
                             name of the second) and the adapter, {kind: "lora", role:
                             "adapter", appliesTo: <node>, adaptedDigest: <the identity the
                             recipe uses>, revision, commit, files}
    predicate.runDetails
        builder   {id, version: {mergebuild, torch, safetensors, python}}
        metadata  {invocationId, startedOn, finishedOn}

Every upstream statement of the whole chain is embedded once, flat, in
``upstreamStatements``, keyed by its statement id (sha256 of its canonical JSON, see
:func:`statement_id`); a dependency names its upstream statement by that id
(``statementDigest``). A chain of depth n is then n statements side by side: linear in
size and of constant nesting, however deep or however often a stage is shared. Statements
written before this layout (``annotations.statement`` holding the upstream statement
itself, nested) are still read (:func:`flatten_statement`).

No secrets are ever written: every string is scrubbed of Hugging Face tokens, URL
credentials and values under secret-looking keys (:func:`scrub_secrets`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from mergebuild.errors import StoreError
from mergebuild.io.json_limits import PROVENANCE_MAX_BYTES, loads_bounded, read_bytes_bounded
from mergebuild.provenance.secrets import scrub_secrets

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE_PREFIX = "https://mergebuild.dev/buildtypes/merge/v"
BUILDER_ID = "https://mergebuild.dev/builder/local"

PROVENANCE_FILE = "provenance.json"
CARD_FILE = "README.md"
# Beside a card that is not the build's own (a Mergefile card: block applied): its attestation.
CARD_ATTESTATION_FILE = "card.json"
CARD_PREDICATE_TYPE = "https://mergebuild.dev/card/v1"
# The test-result attestation of the evals declared at build time (provenance/attestation.py).
EVALUATION_FILE = "evaluation.intoto.json"
# Evals run after the build, attested beside an export or a push (never in the object).
ADDED_EVALUATION_FILE = "evaluation.added.intoto.json"
# Files about the model rather than of it: subjects of the provenance, not of its digest.
DESCRIPTIVE_FILES = (CARD_FILE, EVALUATION_FILE)
DIRECTORY_SUBJECT = "."

# Lowercase hex lengths of the digests we write or accept; others are left alone.
UPSTREAM_KEY = "upstreamStatements"

DIGEST_HEX_LENGTHS = {"sha256": 64, "xxh128": 32, "dirHash": 64, "gitCommit": (40, 64)}

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class ParentRef:
    """One parent of a merge, as it was resolved for this build.

    ``digest`` and the values of ``files`` are ``"sha256:<hex>"`` or ``"xxh128:<hex>"``.
    For ``kind == "node"`` (or a local directory that carries its own provenance),
    ``statement`` is that upstream build's statement; it is embedded so that the whole
    chain is one document.

    A merge read through a LoRA adapter is two parents: the node, whose ``adapter`` names
    the second, and the adapter (``kind == "lora"``), whose ``applies_to`` names the node
    and whose ``adapted_digest`` is the combined identity the child's recipe holds.
    """

    name: str
    role: str
    kind: str
    uri: str
    digest: str
    revision: str | None = None
    commit: str | None = None
    files: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    statement: Mapping | None = None
    method: str | None = None
    adapter: str | None = None
    applies_to: str | None = None
    adapted_digest: str | None = None
    # A sweep parent: which variant its select: chose, every variant's value, and why.
    selection: Mapping | None = None


@dataclass(frozen=True)
class BuildRecord:
    """Everything known about one finished build of one merge node."""

    node: str
    key: str
    digest: str
    method: str
    recipe: Mapping
    spec: Mapping
    mergefile_digest: str
    mergefile_excerpt: str
    parents: tuple[ParentRef, ...]
    outputs: Mapping[str, tuple[str, int]]
    builder: Mapping[str, str]
    device: str
    engine_version: str
    started: str
    finished: str
    invocation_id: str
    rebuild_command: str
    # Scores and verdicts of the evals declared when it was built (plain JSON, see
    # build/evaluation.py): the card's model-index and the test-result attestation.
    evaluation: Mapping | None = None


# --------------------------------------------------------------------------- digests


def digest_set(digest: str) -> dict[str, str]:
    """Split ``"sha256:<hex>"`` into the DigestSet ``{"sha256": "<hex>"}``.

    Raises:
        ValueError: the string has no ``algorithm:`` prefix or no value.
    """
    algorithm, sep, value = digest.partition(":")
    if not sep or not algorithm or not value:
        raise ValueError(f"digest {digest!r} is not of the form '<algorithm>:<hex>'")
    return {algorithm: value.lower()}


def digest_string(digests: Mapping[str, str], prefer: Iterable[str] = ("sha256", "xxh128")) -> str:
    """The inverse of :func:`digest_set`: ``{"sha256": h}`` → ``"sha256:h"``."""
    for algorithm in prefer:
        if algorithm in digests:
            return f"{algorithm}:{digests[algorithm]}"
    algorithm = min(digests)
    return f"{algorithm}:{digests[algorithm]}"


def digests_match(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """DigestSets match when they share an algorithm and every shared one agrees."""
    shared = set(a) & set(b)
    return bool(shared) and all(a[k].lower() == b[k].lower() for k in shared)


def short_digest(digest: str, length: int = 12) -> str:
    """``"sha256:abcdef…"`` cut to ``length`` hex digits."""
    algorithm, sep, value = digest.partition(":")
    return f"{algorithm}:{value[:length]}" if sep else digest[:length]


def dir_hash(files: Mapping[str, str]) -> str:
    """The in-toto ``dirHash`` of a file tree, from each file's sha256 hex.

    sha256 over ``"<sha256>  <name>\\n"`` lines sorted by name (as ``sha256sum`` prints).
    """
    lines = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def sha256_file(path: Path, chunk_size: int = 8 << 20) -> str:
    """Stream a file through sha256 and return the hex digest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- statement


def build_type(engine_version: str) -> str:
    """The buildType URI for a given merge-semantics (engine) version."""
    return f"{BUILD_TYPE_PREFIX}{engine_version}"


def _file_subject(name: str, sha256: str, size: int) -> dict[str, Any]:
    return {"name": name, "digest": {"sha256": sha256.lower()}, "annotations": {"size": size}}


def _dependency(parent: ParentRef, statement_ids: Mapping[str, str]) -> dict[str, Any]:
    # A parent whose digest is unknown is still described by its URI (a valid descriptor).
    digest = digest_set(parent.digest) if parent.digest else {}
    if parent.commit and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", parent.commit.lower()):
        digest["gitCommit"] = parent.commit.lower()
    annotations: dict[str, Any] = {"kind": parent.kind, "role": parent.role}
    if parent.revision is not None:
        annotations["revision"] = parent.revision
    if parent.commit is not None:
        annotations["commit"] = parent.commit
    if parent.files:
        annotations["files"] = {name: parent.files[name] for name in sorted(parent.files)}
    if parent.method is not None:
        annotations["method"] = parent.method
    if statement_ids.get(parent.name) is not None:
        annotations["statementDigest"] = statement_ids[parent.name]
    if parent.adapter is not None:
        annotations["adapter"] = parent.adapter
    if parent.applies_to is not None:
        annotations["appliesTo"] = parent.applies_to
    if parent.adapted_digest is not None:
        annotations["adaptedDigest"] = parent.adapted_digest
    if parent.selection is not None:
        annotations["selection"] = parent.selection
    dependency = {"name": parent.name, "uri": parent.uri, "digest": digest}
    if not digest:
        del dependency["digest"]
    return dependency | {"annotations": annotations}


def build_statement(
    record: BuildRecord, card_sha256: str | None = None, card_size: int | None = None,
    attached: Mapping[str, tuple[str, int]] | None = None,
) -> dict:
    """Build the in-toto Statement v1 / SLSA Provenance v1 document for a record.

    Args:
        record: the finished build.
        card_sha256: sha256 hex of the ``README.md`` written beside the outputs; when
            given, the card is one of the subjects (with ``card_size`` as its size
            annotation when known).
        attached: other files written beside the outputs after the build (the evaluation
            attestation): {name: (sha256 hex, size)}, each a subject.

    Returns:
        A JSON-ready dict, scrubbed of secrets. Same record → equal dict.
    """
    subjects = [
        _file_subject(name, sha, size) for name, (sha, size) in sorted(record.outputs.items())
    ]
    upstream: dict[str, dict] = {}
    statement_ids: dict[str, str] = {}
    for parent in record.parents:
        if parent.statement is None:
            continue
        flat, embedded = flatten_statement(parent.statement)
        statement_ids[parent.name] = statement_id(flat)
        upstream[statement_ids[parent.name]] = flat
        upstream.update(embedded)
    if card_sha256 is not None:
        subject = _file_subject(CARD_FILE, card_sha256, card_size or 0)
        if card_size is None:
            del subject["annotations"]
        subjects.append(subject)
    for name, (sha, size) in sorted((attached or {}).items()):
        subjects.append(_file_subject(name, sha, size))
    subjects.sort(key=lambda s: s["name"])
    directory_digest = digest_set(record.digest)
    directory_digest["dirHash"] = dir_hash(
        {n: sha.lower() for n, (sha, _) in record.outputs.items()}
    )
    subjects.append(
        {
            "name": DIRECTORY_SUBJECT,
            "digest": directory_digest,
            "annotations": {
                "kind": "directory",
                "files": len(record.outputs),
                "size": sum(size for _, size in record.outputs.values()),
            },
        }
    )
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": build_type(record.engine_version),
                "externalParameters": {
                    "node": record.node,
                    "method": record.method,
                    "spec": record.spec,
                    "mergefile_digest": record.mergefile_digest,
                },
                "internalParameters": {
                    "key": record.key,
                    "digest": record.digest,
                    "engine_version": record.engine_version,
                    "device": record.device,
                    "recipe": record.recipe,
                },
                "resolvedDependencies": [_dependency(p, statement_ids) for p in record.parents],
            },
            "runDetails": {
                "builder": {
                    "id": BUILDER_ID,
                    "version": {k: str(record.builder[k]) for k in sorted(record.builder)},
                },
                "metadata": {
                    "invocationId": record.invocation_id,
                    "startedOn": record.started,
                    "finishedOn": record.finished,
                },
            },
        },
    }
    statement = scrub_secrets(statement)
    if upstream:  # scrubbed when each was written; scrubbing again would only cost time
        internal = statement["predicate"]["buildDefinition"]["internalParameters"]
        internal[UPSTREAM_KEY] = {k: upstream[k] for k in sorted(upstream)}
    return statement


def statement_id(statement: Mapping) -> str:
    """The id an embedded statement is filed under: ``"sha256:<hex>"`` of its canonical JSON
    (sorted keys, no whitespace), so the same statement always gets the same id."""
    canonical = json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def _without_upstream(statement: Mapping) -> tuple[dict, dict]:
    """A deep copy of ``statement`` without its ``upstreamStatements``, and that map (not
    copied: its statements are flat, and nothing here edits a flat statement)."""
    internal = _definition(statement).get("internalParameters")
    embedded = internal.get(UPSTREAM_KEY) if isinstance(internal, Mapping) else None
    if isinstance(embedded, Mapping):
        predicate = statement["predicate"]
        definition = predicate["buildDefinition"]
        statement = {**statement, "predicate": {**predicate, "buildDefinition": {
            **definition, "internalParameters": {
                k: v for k, v in internal.items() if k != UPSTREAM_KEY}}}}
    copy = json.loads(json.dumps(statement))  # the caller's statement stays as it was
    return copy, dict(embedded) if isinstance(embedded, Mapping) else {}


def flatten_statement(statement: Mapping) -> tuple[dict, dict[str, dict]]:
    """``statement`` without the statements it embeds, and every statement of its chain.

    Returns ``(flat, upstream)``: ``flat`` is the statement as it is filed inside a child's
    provenance (no ``upstreamStatements``; each dependency names its upstream by
    ``statementDigest``), ``upstream`` maps statement id → flat statement for the whole
    chain. Legacy statements that nest their upstream in ``annotations.statement`` are
    converted, iteratively (no recursion, whatever the chain's depth).
    """
    flat, upstream = _without_upstream(statement)
    upstream = {str(k): v for k, v in upstream.items() if isinstance(v, dict)}
    pending = [flat, *upstream.values()]
    while pending:
        for notes in _annotations(pending.pop()):
            if not isinstance(notes.get("statement"), Mapping):
                continue
            nested, more = _without_upstream(notes.pop("statement"))
            pending.append(nested)
            pending.extend(more.values())
            upstream.update(more)
            notes["_nested"] = nested
    # Ids are computed after every nested statement is itself flat, children first.
    stack = [flat, *upstream.values()]
    seen: set[int] = set()
    while stack:
        current = stack[-1]
        children = [a["_nested"] for a in _annotations(current)
                    if "_nested" in a and id(a["_nested"]) not in seen]
        if children:
            stack.extend(children)
            continue
        stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for notes in _annotations(current):
            nested = notes.pop("_nested", None)
            if nested is not None:
                notes["statementDigest"] = statement_id(nested)
                upstream[notes["statementDigest"]] = nested
    return flat, upstream


def _definition(statement: Any) -> Mapping:
    """``predicate.buildDefinition`` of a statement, ``{}`` where it is not there."""
    predicate = statement.get("predicate") if isinstance(statement, Mapping) else None
    definition = predicate.get("buildDefinition") if isinstance(predicate, Mapping) else None
    return definition if isinstance(definition, Mapping) else {}


def _annotations(statement: Any) -> list[dict]:
    deps = _definition(statement).get("resolvedDependencies", [])
    return [dep["annotations"] for dep in (deps if isinstance(deps, list) else [])
            if isinstance(dep, Mapping) and isinstance(dep.get("annotations"), dict)]


def upstream_statement(dependency: Mapping, upstream: Mapping[str, Mapping]) -> Mapping | None:
    """The statement ``dependency`` embeds, looked up in the chain's ``upstream`` map (see
    :func:`flatten_statement`); ``None`` for a source."""
    annotations = dependency.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        return None
    if isinstance(annotations.get("statement"), Mapping):  # a legacy nested statement
        return annotations["statement"]
    found = upstream.get(str(annotations.get("statementDigest")))
    return found if isinstance(found, Mapping) else None


def dumps_statement(statement: Mapping) -> bytes:
    """Serialise a statement the one way we write it: sorted keys, 2-space indent, except
    that each embedded upstream statement is one line of its own (compact JSON, written by
    the C encoder: a chain 500 stages deep is written in milliseconds, not seconds)."""
    internal = _definition(statement).get("internalParameters")
    upstream = internal.get(UPSTREAM_KEY) if isinstance(internal, Mapping) else None
    if not isinstance(upstream, Mapping) or not upstream:
        return (json.dumps(statement, indent=2, sort_keys=True, ensure_ascii=False)
                + "\n").encode()
    marker = "\u0000upstream statements\u0000"
    shallow = json.loads(json.dumps({k: v for k, v in statement.items() if k != "predicate"}))
    predicate = dict(statement["predicate"])
    definition = dict(predicate["buildDefinition"])
    definition["internalParameters"] = dict(internal, **{UPSTREAM_KEY: marker})
    predicate["buildDefinition"] = definition
    shallow["predicate"] = predicate
    text = json.dumps(shallow, indent=2, sort_keys=True, ensure_ascii=False)
    quoted = json.dumps(marker)
    at = text.index(quoted)
    indent = text[text.rindex("\n", 0, at) + 1:at].removesuffix(json.dumps(UPSTREAM_KEY) + ": ")
    lines = [f"{indent}  {json.dumps(key, ensure_ascii=False)}: "
             + json.dumps(upstream[key], sort_keys=True, ensure_ascii=False,
                          separators=(",", ":"))
             for key in sorted(upstream)]
    block = "{\n" + ",\n".join(lines) + "\n" + indent + "}"
    return (text[:at] + block + text[at + len(quoted):] + "\n").encode()


# --------------------------------------------------------------------------- reading


def statement_problems(statement: Any) -> list[str]:
    """Structural problems of a statement as mergebuild writes it (empty when valid)."""
    if not isinstance(statement, Mapping):
        return ["not a JSON object"]
    problems = []
    if statement.get("_type") != STATEMENT_TYPE:
        problems.append(f"_type is {statement.get('_type')!r}, expected {STATEMENT_TYPE}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        problems.append(f"predicateType is not {PREDICATE_TYPE}")
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not subjects:
        problems.append("subject is missing or empty")
        subjects = []
    for i, subject in enumerate(subjects):
        if not isinstance(subject, Mapping) or not isinstance(subject.get("name"), str):
            problems.append(f"subject[{i}] has no name")
            continue
        digest = subject.get("digest")
        if not isinstance(digest, Mapping) or not digest:
            problems.append(f"subject {subject['name']!r} has no digest")
            continue
        problems += [f"subject {subject['name']!r}: {p}" for p in _digest_problems(digest)]
        if subject["name"] != DIRECTORY_SUBJECT and "sha256" not in digest:
            problems.append(f"subject {subject['name']!r} has no sha256 digest")
        annotations = subject.get("annotations", {})
        if not isinstance(annotations, Mapping):
            problems.append(f"subject {subject['name']!r}: annotations is not an object")
        elif "size" in annotations and not _is_size(annotations["size"]):
            problems.append(f"subject {subject['name']!r}: size is not a non-negative integer")
    predicate = statement.get("predicate")
    if not isinstance(predicate, Mapping):
        return problems + ["predicate is missing"]
    definition = predicate.get("buildDefinition")
    if not isinstance(definition, Mapping):
        return problems + ["predicate.buildDefinition is missing"]
    if not isinstance(definition.get("buildType"), str):
        problems.append("buildDefinition.buildType is missing")
    if not isinstance(definition.get("externalParameters"), Mapping):
        problems.append("buildDefinition.externalParameters is missing")
    deps = definition.get("resolvedDependencies", [])
    if not isinstance(deps, list):
        problems.append("buildDefinition.resolvedDependencies is not a list")
        deps = []
    for i, dep in enumerate(deps):
        if not isinstance(dep, Mapping) or not (dep.get("uri") or dep.get("digest")):
            problems.append(f"resolvedDependencies[{i}] has neither uri nor digest")
        elif "digest" in dep:
            problems += [f"resolvedDependencies[{i}]: {p}" for p in _digest_problems(dep["digest"])]
    run = predicate.get("runDetails")
    if not isinstance(run, Mapping) or not isinstance(run.get("builder"), Mapping):
        problems.append("predicate.runDetails.builder is missing")
    elif not isinstance(run["builder"].get("id"), str):
        problems.append("runDetails.builder.id is missing")
    return problems


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _digest_problems(digest: Any) -> list[str]:
    if not isinstance(digest, Mapping) or not digest:
        return ["digest is not a non-empty object"]
    problems = []
    for algorithm, value in digest.items():
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]+", value):
            problems.append(f"{algorithm} digest is not lowercase hex")
            continue
        lengths = DIGEST_HEX_LENGTHS.get(algorithm)
        if isinstance(lengths, int):
            lengths = (lengths,)
        if lengths and len(value) not in lengths:
            problems.append(f"{algorithm} digest has {len(value)} hex digits")
    return problems


def read_statement(directory: Path, *, upstream: bool = True) -> dict:
    """Read and structurally check ``provenance.json`` in a built model directory.

    With ``upstream=False`` the embedded upstream statements are skipped without being
    parsed (as :func:`dumps_statement` writes them, one line each, they are cut out of the
    text first): what a store lookup needs, in time independent of the chain's depth.

    Raises:
        StoreError: the file is missing, not JSON, or not a mergebuild statement; the
            message is one line naming the file and the first problem.
    """
    path = Path(directory) / PROVENANCE_FILE
    try:
        data = read_bytes_bounded(path, PROVENANCE_MAX_BYTES)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise StoreError(f"{path}: no provenance (not a mergebuild build?)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: cannot read provenance: {exc}") from None
    except ValueError as exc:
        raise StoreError(f"{path}: cannot read provenance: {exc}") from None
    if not upstream:
        text = _without_upstream_text(text)
    try:
        statement = loads_bounded(text)
    except json.JSONDecodeError as exc:
        raise StoreError(
            f"{path}: provenance is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    problems = statement_problems(statement)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(f"{path}: invalid provenance: {problems[0]}{more}")
    return statement


def _without_upstream_text(text: str) -> str:
    """``text`` with the value of ``upstreamStatements`` replaced by ``{}``, when it is laid
    out as :func:`dumps_statement` writes it; otherwise ``text`` unchanged."""
    opening = f'"{UPSTREAM_KEY}": {{\n'
    at = text.find(opening)
    if at < 0:
        return text
    indent = text[text.rfind("\n", 0, at) + 1:at]
    if indent.strip():
        return text
    closing = text.find(f"\n{indent}}}", at)
    if closing < 0:
        return text
    return text[:at] + f'"{UPSTREAM_KEY}": {{}}' + text[closing + len(indent) + 2:]


def subject_files(statement: Mapping) -> dict[str, tuple[str, int | None]]:
    """``{filename: (sha256 hex, size or None)}`` for every file subject of a statement."""
    files = {}
    for subject in statement["subject"]:
        if subject["name"] == DIRECTORY_SUBJECT or "sha256" not in subject["digest"]:
            continue
        size = subject.get("annotations", {}).get("size")
        files[subject["name"]] = (subject["digest"]["sha256"], size)
    return files


def directory_digest(statement: Mapping) -> dict[str, str]:
    """The DigestSet of the whole-directory subject (``{}`` if there is none)."""
    for subject in statement["subject"]:
        if subject["name"] == DIRECTORY_SUBJECT:
            return dict(subject["digest"])
    return {}


def statement_digest(statement: Mapping) -> str:
    """The build's content digest (``"sha256:<hex>"``), as children reference it."""
    return str(statement["predicate"]["buildDefinition"]["internalParameters"]["digest"])
