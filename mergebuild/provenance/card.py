"""Render the Hugging Face model card (README.md) of a built merge from its build record.

The card is a pure function of the record: same record → same bytes. Run times and the
invocation id are left out (they live in provenance.json), so a reproduced build gets the
same card.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mergebuild.io.json_limits import CONFIG_MAX_BYTES, read_json_bounded
from mergebuild.provenance.lineage import (
    LineageNode,
    format_parameters,
    hub_id,
    iter_lineage,
    lineage_from_statement,
    lineage_hub_ids,
    lineage_methods,
    snapshot_repo,
)
from mergebuild.provenance.secrets import scrub_text
from mergebuild.provenance.statement import (
    CARD_FILE,
    CARD_PREDICATE_TYPE,
    BuildRecord,
    build_statement,
    short_digest,
)

MERGEBUILD_URL = "https://github.com/mergebuild/mergebuild"

_EVALUATION_INTRO = (
    "A merge can keep its average score while losing what one parent was chosen for. "
    "Before relying on this model:"
)
_EVALUATION_PER_PARENT = (
    "- Evaluate it on each parent's specialty, not only on averaged benchmarks, "
    "and compare with that parent on that task:"
)
_EVALUATION_CHECKS = (
    "- Compare with the base model on general ability, to catch regressions the merge "
    + "introduced.",
    "- Check the chat template, tokenizer and special tokens come from the parent you "
    + "intended, and that generation stops where it should.",
    "- Evaluate each intermediate stage as well; a weak intermediate limits every stage "
    + "built on it.",
)
_PROVENANCE_TEXT = (
    "## Provenance\n\n"
    "`provenance.json` beside this card is an in-toto Statement (v1) with a SLSA "
    "Provenance (v1) predicate: every file's sha256, every parent's digest and hub commit, "
    "and each upstream stage's own statement embedded, so the whole chain is one document. "
    "`mergebuild lineage DIR` shows the tree and `mergebuild verify DIR` re-checks every "
    "byte, without the Mergefile.\n"
)


def render_card(record: BuildRecord) -> str:
    """The model card of ``record``: Hub metadata, lineage, parameters, rebuild, advice.

    Front matter: ``base_model`` lists every hub repo the whole lineage reaches (through
    any number of intermediate stages, sorted, deduplicated), ``base_model_relation:
    merge``, ``library_name: transformers`` and ``tags`` (merge, mergebuild, methods).

    Example:
        >>> text = render_card(record)
        >>> ModelCard(text).data.base_model
        ['org/base', 'org/coder']
    """
    statement = build_statement(record)
    root = lineage_from_statement(statement)
    spec = statement["predicate"]["buildDefinition"]["externalParameters"]["spec"]
    sections = [
        _front_matter(root, record),
        _introduction(record, root, spec),
        *filter(None, [_results_section(record)]),
        _lineage_section(root),
        _parameters_section(record, spec),
        _build_section(record),
        _rebuild_section(record),
        _evaluation_section(root),
        _provenance_section(),
    ]
    return scrub_text("\n".join(sections))


def _front_matter(root: LineageNode, record: BuildRecord) -> str:
    metadata: dict[str, Any] = {}
    hubs = lineage_hub_ids(root)
    if hubs:
        metadata["base_model"] = hubs
        metadata["base_model_relation"] = "merge"
    metadata["library_name"] = "transformers"
    tags = ["merge", "mergebuild"]
    tags += [m for m in lineage_methods(root) if m not in tags]
    metadata["tags"] = tags
    if record.evaluation and _measured(record.evaluation):
        metadata["model-index"] = _model_index(record.node, record.evaluation)
    body = yaml.safe_dump(
        metadata, sort_keys=False, allow_unicode=True, default_flow_style=False, width=10_000
    )
    return f"---\n{body}---\n"


def _introduction(record: BuildRecord, root: LineageNode, spec: Mapping[str, Any]) -> str:
    stages = [n for n in iter_lineage(root) if n.is_build and n.kind != "lora"]
    adapted = sum(1 for n in iter_lineage(root) if n.kind == "lora")
    sources = [n for n in iter_lineage(root) if not n.is_build]
    hubs = lineage_hub_ids(root)
    local = sum(1 for s in sources if s.kind != "hub")
    parents = ", ".join(f"`{_display_name(p)}` ({p.role})" for p in root.children)
    lines = [f"# {record.node}", ""]
    description = spec.get("description") if isinstance(spec, Mapping) else None
    if isinstance(description, str) and description.strip():
        lines += [description.strip(), ""]
    lines += [
        (
            f"`{record.node}` is a model merge built with [mergebuild]({MERGEBUILD_URL}): "
            f"**{record.method}** of {parents or 'no parents'}."
        ),
        "",
        (
            f"Its lineage has {_count(len(stages), 'merge stage')}"
            + (f", {_count(adapted, 'LoRA adapter')} applied to a merge's output"
               if adapted else "")
            + " and "
            f"{_count(len(sources), 'original checkpoint')} "
            f"({_count(len(hubs), 'Hugging Face repo')}, "
            f"{_count(local, 'local directory', 'local directories')})."
        ),
        "",
        f"- Content digest: `{record.digest}`",
        f"- Recipe key: `{record.key}`",
        f"- Merge engine version: `{record.engine_version}`",
        "",
    ]
    return "\n".join(lines)


def _lineage_section(root: LineageNode) -> str:
    nodes = list(iter_lineage(root))
    ids = {_identity(n): f"n{i}" for i, n in enumerate(nodes)}
    mermaid = ["graph TD"]
    for node in nodes:
        mermaid.append(f'  {ids[_identity(node)]}["{_mermaid_label(node)}"]')
    edges: list[str] = []
    for node in nodes:
        for parent in node.children:
            edge = (
                f"  {ids[_identity(parent)]} -->|{parent.role or 'parent'}| {ids[_identity(node)]}"
            )
            if edge not in edges:
                edges.append(edge)
    mermaid += edges
    lines = ["## Lineage", "", "```mermaid", *mermaid, "```", ""]
    lines += [
        "### Merge stages",
        "",
        "| Stage | Method | Key parameters | Parents |",
        "|---|---|---|---|",
    ]
    for stage in (n for n in nodes if n.is_build):
        parents = "<br>".join(_parent_cell(p) for p in stage.children)
        lines.append(
            f"| `{_cell(stage.name)}` | {_cell(stage.method or '?')} | "
            f"{_cell(format_parameters(stage.params)) or '—'} | {parents or '—'} |"
        )
    lines += [
        "",
        "### Original checkpoints",
        "",
        "| Source | Kind | Location | Revision | Commit | Digest |",
        "|---|---|---|---|---|---|",
    ]
    for source in (n for n in nodes if not n.is_build):
        commit = source.commit
        if source.kind == "hub":
            where = f"`{_cell(hub_id(source.uri) or source.uri)}`"
        else:  # a local copy inside a Hugging Face cache names its repo and commit
            repo, snapshot = snapshot_repo(source.uri)
            where = f"`{_cell(source.uri)}`" + (
                f" (Hugging Face cache of `{_cell(repo)}`)" if repo else "")
            commit = commit or snapshot
        lines.append(
            f"| `{_cell(source.name)}` | {source.kind} | {where} | {_code(source.revision)} | "
            f"{_code(commit)} | `{short_digest(source.digest)}` |"
        )
    return "\n".join(lines) + "\n"


def _parameters_section(record: BuildRecord, spec: Any) -> str:
    text = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return "\n".join(
        [
            f"## Merge parameters of `{record.node}`",
            "",
            "The node as written in the Mergefile, after defaults:",
            "",
            _fenced(text, "yaml"),
            "",
        ]
    )


def _build_section(record: BuildRecord) -> str:
    lines = ["## Built with", "", "| Component | Version |", "|---|---|"]
    for name in sorted(record.builder):
        lines.append(f"| {_cell(name)} | `{_cell(str(record.builder[name]))}` |")
    lines += [f"| device | `{_cell(record.device)}` |", ""]
    return "\n".join(lines)


def _rebuild_section(record: BuildRecord) -> str:
    return "\n".join(
        [
            "## How to rebuild",
            "",
            "This Mergefile excerpt holds this node and every node it depends on:",
            "",
            _fenced(record.mergefile_excerpt.rstrip("\n") + "\n", "yaml"),
            "",
            "Then run:",
            "",
            _fenced(record.rebuild_command.strip() + "\n", "sh"),
            "",
            (
                f"A faithful rebuild has the content digest `{record.digest}`. Deterministic "
                "methods reproduce bit for bit on the same device type; "
                "`mergebuild make --check` audits exactly that."
            ),
            "",
        ]
    )


def _measured(evaluation: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {name: e for name, e in (evaluation.get("evals") or {}).items() if e.get("metrics")}


def _model_index(node: str, evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Hugging Face's ``model-index``: one result per eval, its scores as metrics (the Hub
    renders it; ``huggingface_hub.ModelCard`` reads it into ``eval_results``)."""
    results = []
    for name, entry in sorted(_measured(evaluation).items()):
        metrics = [{"type": metric, "name": metric, "value": value}
                   for metric, value in entry["metrics"].items()
                   if entry.get("higher_is_better", {}).get(metric) is not None]
        if not metrics:
            continue
        results.append({
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": {"type": name, "name": name,
                        "config": entry["digest"], "split": "test"},
            "metrics": metrics,
            "source": {"name": "mergebuild", "url": MERGEBUILD_URL},
        })
    return [{"name": node, "results": results}]


def _results_section(record: BuildRecord) -> str:
    """Scores measured when the model was built, and the checks it was held to."""
    evaluation = record.evaluation
    if not evaluation or not (_measured(evaluation) or evaluation.get("checks")):
        return ""
    lines = ["## Evaluation results", "",
             "Measured by mergebuild when this model was built (each eval is identified by the "
             "digest of its definition and data; `evaluation.intoto.json` attests them).", "",
             "| eval | metric | value |", "|---|---|---|"]
    for name, entry in sorted(_measured(evaluation).items()):
        for metric, value in entry["metrics"].items():
            lines.append(f"| {_cell(name)} | {_cell(metric)} | {value:.4g} |")
    checks = evaluation.get("checks") or []
    if checks:
        lines += ["", "Checks:", ""]
        lines += [f"- {'passed' if c['passed'] else '**FAILED**'}: {_cell(c['check'])}"
                  for c in checks]
    lines.append("")
    return "\n".join(lines) + "\n"


def _evaluation_section(root: LineageNode) -> str:
    lines = [
        "## Evaluation advice",
        "",
        _EVALUATION_INTRO,
        "",
        _EVALUATION_PER_PARENT,
    ]
    for source in (n for n in iter_lineage(root) if not n.is_build):
        if source.kind == "hub":
            at = f" @ `{source.revision}`" if source.revision else ""
            lines.append(f"  - `{_display_name(source)}`{at} (Hugging Face)")
        else:
            lines.append(f"  - `{source.name}` ({source.kind}: `{source.uri}`)")
    lines += [*_EVALUATION_CHECKS, ""]
    return "\n".join(lines)


def _provenance_section() -> str:
    return _PROVENANCE_TEXT


# --------------------------------------------------------------------------- helpers


def _identity(node: LineageNode) -> tuple[str, str, str]:
    return (node.kind, node.uri, node.digest)


def _display_name(node: LineageNode) -> str:
    if node.kind == "hub":
        return hub_id(node.uri) or node.name
    return node.name


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


def _mermaid_label(node: LineageNode) -> str:
    if node.is_build:
        parts = [node.name, node.method or "?"]
    elif node.kind == "hub":
        parts = [hub_id(node.uri) or node.name]
        if node.revision:
            parts.append(f"@ {node.revision}")
    else:
        parts = [node.name, "local"]
    parts.append(short_digest(node.digest, 8))
    return "<br/>".join(_mermaid_escape(p) for p in parts)


def _mermaid_escape(text: str) -> str:
    return (
        text.replace("&", "#amp;")
        .replace('"', "#quot;")
        .replace("<", "#lt;")
        .replace(">", "#gt;")
        .replace("\n", " ")
    )


def _parent_cell(parent: LineageNode) -> str:
    name = _display_name(parent)
    text = f"{parent.role or 'parent'}: `{_cell(name)}`"
    if parent.revision:
        text += f" @ `{_cell(parent.revision)}`"
    if parent.commit:
        text += f" (commit `{_cell(parent.commit[:12])}`)"
    return text + f" `{short_digest(parent.digest)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _code(value: str | None) -> str:
    return f"`{_cell(value)}`" if value else "—"


def _fenced(text: str, language: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}{fence}"


# --------------------------------------------------------------------------- front matter


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """A card's YAML front matter (``{}`` if it has none) and the Markdown after it."""
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 3)
    if end < 0:
        return {}, text
    try:
        metadata = yaml.safe_load(text[4:end + 1]) or {}
    except yaml.YAMLError:
        return {}, text
    if not isinstance(metadata, dict):
        return {}, text
    return metadata, text[end + len("\n---\n"):]


def join_front_matter(metadata: Mapping[str, Any], body: str) -> str:
    """The inverse of :func:`split_front_matter` (keys in the given order)."""
    if not metadata:
        return body
    text = yaml.safe_dump(dict(metadata), sort_keys=False, allow_unicode=True,
                          default_flow_style=False, width=10_000)
    return f"---\n{text}---\n{body}"


# --------------------------------------------------------------------------- the card: block

_LICENCE_HEADING = "## Licence"


def licence_of(directory: Path) -> str | None:
    """A model directory's licence as its own files state it: the card's ``license`` front
    matter, else ``config.json``'s ``license``; None when neither says (or cannot be read)."""
    directory = Path(directory)
    try:
        metadata, _ = split_front_matter((directory / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        metadata = {}
    found = metadata.get("license")
    if not found:
        try:
            config = read_json_bounded(directory / "config.json", CONFIG_MAX_BYTES)
        except (OSError, UnicodeDecodeError, ValueError):
            config = {}
        found = config.get("license") if isinstance(config, dict) else None
    if isinstance(found, list):
        found = found[0] if len(found) == 1 else ", ".join(map(str, found))
    return str(found) if found else None


def licence_warnings(licences: Mapping[str, str | None]) -> list[str]:
    """What a release reviewer must hear about the parents' licences (``{parent: licence or
    None}``): licences that differ, and parents whose licence is unknown."""
    warnings = []
    unknown = [name for name, licence in licences.items() if not licence]
    known = {name: licence for name, licence in licences.items() if licence}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{name}: {licence}" for name, licence in known.items())
        warnings.append(f"the parents' licences differ ({listed}); the merge must satisfy "
                        "every one of them")
    if unknown:
        warnings.append(f"the licence of {', '.join(unknown)} is unknown (no card or config "
                        "says it); check it before release, or declare it with "
                        "card: {license: …} on the source")
    return warnings


def merged_licence(declared: str | None, licences: Mapping[str, str | None]) -> str | None:
    """The licence a card states: the one declared, else the parents' when they all agree."""
    if declared:
        return declared
    values = set(licences.values())
    if len(values) == 1 and None not in values:
        return next(iter(values))
    return None


def apply_card(base: str, card: Mapping[str, Any], licences: Mapping[str, str | None]) -> str:
    """The build's own card (``base``, rendered from its record) with a ``card:`` block
    applied: Hub metadata (license, language, datasets, pipeline_tag, extra tags) in the
    front matter, the introduction under the title, and a licence section with warnings.

    A pure function of its arguments: the object's card never changes; this one is kept
    beside it, keyed by its inputs.
    """
    metadata, body = split_front_matter(base)
    licence = merged_licence(card.get("license"), licences)
    out: dict[str, Any] = {}
    if licence:
        out["license"] = licence
        for key in ("license_name", "license_link"):
            if card.get(key):
                out[key] = card[key]
    for key in ("language", "datasets"):
        if card.get(key):
            out[key] = list(card[key])
    if card.get("pipeline_tag"):
        out["pipeline_tag"] = card["pipeline_tag"]
    out.update((k, v) for k, v in metadata.items() if k not in out and k != "tags")
    out["tags"] = list(dict.fromkeys([*(metadata.get("tags") or []), *(card.get("tags") or [])]))
    stripped = body.lstrip("\n")
    lead, (title, sep, rest) = body[:len(body) - len(stripped)], stripped.partition("\n\n")
    if card.get("introduction") and sep:
        body = f"{lead}{title}\n\n{card['introduction'].strip()}\n\n{rest}"
    warnings = licence_warnings(licences)
    if licences:
        lines = [_LICENCE_HEADING, ""]
        lines.append(f"This merge is released under `{licence}`." if licence else
                     "No licence is stated for this merge.")
        lines += ["", "| Parent | Licence |", "|---|---|"]
        lines += [f"| `{_cell(name)}` | {_code(value)} |" for name, value in licences.items()]
        lines.append("")
        lines += [f"> **Warning:** {w}" for w in warnings]
        section = "\n".join(lines).rstrip("\n") + "\n\n"
        at = body.find("## Lineage")
        body = body[:at] + section + body[at:] if at >= 0 else body + "\n" + section
    return scrub_text(join_front_matter(out, body))


def card_attestation(text: str, build_digest: str, node: str, card: Mapping[str, Any],
                     licences: Mapping[str, str | None]) -> dict[str, Any]:
    """The small in-toto statement beside a card that is not the build's own: it names the
    card's sha256 and binds it to the build's content digest, so ``verify`` checks the
    card presented with a build as strictly as the build's own."""
    data = text.encode("utf-8")
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": CARD_FILE, "digest": {"sha256": hashlib.sha256(data).hexdigest()},
                     "annotations": {"size": len(data)}}],
        "predicateType": CARD_PREDICATE_TYPE,
        "predicate": {"build": {"node": node, "digest": build_digest}, "card": dict(card),
                      "licences": dict(licences),
                      "warnings": licence_warnings(licences)},
    }
