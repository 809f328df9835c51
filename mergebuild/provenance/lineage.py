"""Read a built model's lineage back from its statements, from the artifacts alone.

Everything here works on a statement or a model directory (``provenance.json`` with the
upstream statements embedded); no Mergefile and no store are needed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from mergebuild.io.hf_layout import parse_snapshot_path
from mergebuild.provenance.statement import (
    digest_string,
    flatten_statement,
    read_statement,
    short_digest,
)

if TYPE_CHECKING:
    from rich.tree import Tree

# Keys of a node spec that say where parents come from rather than how they are merged.
_STRUCTURAL_KEYS = frozenset(
    {
        "method",
        "merge_method",
        "description",
        "name",
        "model",
        "models",
        "base_model",
        "base",
        "parents",
        "parameters",
        "slices",
        "sources",
        "source",
        "path",
        "repo",
        "revision",
    }
)

@dataclass(frozen=True)
class LineageNode:
    """One model in a lineage tree; ``children`` are its parents.

    ``kind`` is ``"node"`` for a merge built by mergebuild (its own statement was
    embedded), ``"hub"`` or ``"local"`` for a source, ``"lora"`` for a merge read through
    a LoRA adapter (its parents: the merge, role ``"model"``, and the adapter, role
    ``"adapter"``). ``role`` is the part it played for the model below it (``"base"``,
    ``"model"``, ``"slice"``, ``"adapter"``), ``None`` at the root.
    """

    name: str
    kind: str
    digest: str
    uri: str
    method: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    role: str | None = None
    key: str | None = None
    revision: str | None = None
    commit: str | None = None
    children: tuple[LineageNode, ...] = ()
    # {eval: {metric: value}} known for this stage's bytes (filled from the store, if any)
    scores: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def is_build(self) -> bool:
        """True for a merge stage (a node, or a local directory with its own provenance)."""
        return self.kind == "node" or bool(self.children)


# --------------------------------------------------------------------------- lineage


def key_parameters(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs of a node worth showing in one line, sorted by name.

    The node's ``parameters``, each parent's ``parameters`` as ``<parent>.<name>``, and
    other top-level scalar settings (``dtype``, ``tokenizer_source``…).
    """
    params: dict[str, Any] = {}
    if not isinstance(spec, Mapping):
        return params
    if isinstance(spec.get("parameters"), Mapping):
        params.update({str(k): v for k, v in spec["parameters"].items() if _showable(v)})
    for entry in spec.get("models") or ():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("parameters"), Mapping):
            continue
        parent = entry.get("model") or entry.get("name") or "?"
        for name, value in entry["parameters"].items():
            if _showable(value):
                params[f"{parent}.{name}"] = value
    slices = _slices_summary(spec.get("slices"))
    if slices:
        params["slices"] = slices
    for name, value in spec.items():
        if name not in _STRUCTURAL_KEYS and _showable(value) and not isinstance(value, list):
            params[str(name)] = value
    return {k: params[k] for k in sorted(params)}


def _slices_summary(slices: Any) -> str | None:
    """``[{sources: [{model: a, layer_range: [0, 8]}]}, …]`` → ``"a[0:8] + b[8:16]"``."""
    if not isinstance(slices, list) or not slices:
        return None
    parts = []
    for entry in slices:
        sources = entry.get("sources") if isinstance(entry, Mapping) else None
        for source in sources or ():
            if not isinstance(source, Mapping):
                continue
            layers = source.get("layer_range")
            where = (
                f"[{layers[0]}:{layers[1]}]"
                if isinstance(layers, list) and len(layers) == 2
                else ""
            )
            parts.append(f"{source.get('model', '?')}{where}")
    return " + ".join(parts) or None


def _showable(value: Any) -> bool:
    scalar = (str, int, float, bool, type(None))
    return isinstance(value, scalar) or (
        isinstance(value, list) and all(isinstance(v, scalar) or _is_filter(v) for v in value)
    )


def _is_filter(entry: Any) -> bool:
    return isinstance(entry, Mapping) and "value" in entry and set(entry) <= {"filter", "value"}


def _compact(value: Any) -> Any:
    """A ``[{filter, value}, …]`` list as ``"self_attn:[0,0.5]; mlp:0.3; *:0.5"``."""
    if isinstance(value, list) and value and all(_is_filter(v) for v in value):
        return "; ".join(
            f"{e.get('filter') or '*'}:{json.dumps(e['value'], separators=(',', ':'))}"
            for e in value
        )
    return value


def format_parameters(params: Mapping[str, Any], max_value: int = 40) -> str:
    """``{"dtype": "bfloat16", "t": 0.5}`` → ``"dtype=bfloat16, t=0.5"`` (given order).

    Values longer than ``max_value`` characters (a chat template…) are cut with ``…``.
    """
    shown = []
    for key, value in params.items():
        value = _compact(value)
        text = value if isinstance(value, str) else json.dumps(value)
        text = " ".join(text.split())
        if len(text) > max_value:
            text = text[: max_value - 1] + "…"
        shown.append(f"{key}={text}")
    return ", ".join(shown)


def hub_id(uri: str) -> str | None:
    """``"hf://org/name@rev"`` → ``"org/name"``; ``None`` if the URI is not a hub URI.

    An adapted source's URI (``"hf://org/base+hf://org/lora"``) gives its model's repo. A
    local directory inside a Hugging Face cache snapshot
    (``file:///…/models--org--name/snapshots/<commit>``) is that repo too: the cache's
    layout names it exactly (``/`` in the repo id became the first ``--``).
    """
    if uri.startswith(("file://", "./", "~/")):  # a local path, perhaps a hub cache snapshot
        return snapshot_repo(uri)[0]
    for prefix in ("hf://", "https://huggingface.co/"):
        if uri.startswith(prefix):
            path = uri[len(prefix) :].split("+", 1)[0]
            break
    else:
        return None
    parts = [p for p in path.split("/") if p]
    if parts and parts[0] == "models":
        parts = parts[1:]
    if not parts:
        return None
    repo = "/".join(parts[:2]) if len(parts) > 1 else parts[0]
    return repo.split("@", 1)[0]


def lineage_from_statement(statement: Mapping[str, Any]) -> LineageNode:
    """The lineage tree of the build a statement describes (embedded chain included).

    Built iteratively, parents first, each embedded statement once: a stage reached by
    several paths is one shared node, and no chain is too deep.
    """
    root, upstream = flatten_statement(statement)
    built: dict[str, LineageNode] = {}
    stack: list[tuple[str, Mapping[str, Any]]] = [("", root)]
    while stack:
        sid, current = stack[-1]
        missing = [(child, upstream[child]) for child in _upstream_ids(current)
                   if child in upstream and child not in built]
        if missing:
            stack.extend(missing)
            continue
        stack.pop()
        if sid not in built:
            built[sid] = _stage_node(current, built, upstream)
    return built[""]


def _upstream_ids(statement: Mapping[str, Any]) -> list[str]:
    definition = statement.get("predicate", {}).get("buildDefinition", {})
    ids = []
    for dep in definition.get("resolvedDependencies", []):
        annotations = dep.get("annotations") if isinstance(dep, Mapping) else None
        if isinstance(annotations, Mapping) and isinstance(annotations.get("statementDigest"), str):
            ids.append(annotations["statementDigest"])
    return ids


def _stage_node(statement: Mapping[str, Any], built: Mapping[str, LineageNode],
                upstream: Mapping[str, Mapping[str, Any]]) -> LineageNode:
    definition = statement["predicate"]["buildDefinition"]
    external = definition.get("externalParameters", {})
    internal = definition.get("internalParameters", {})
    name = str(external.get("node", "?"))
    return LineageNode(
        name=name,
        kind="node",
        digest=str(internal.get("digest", "")),
        uri=f"mergebuild:node/{name}",
        method=external.get("method"),
        params=key_parameters(external.get("spec", {})),
        key=internal.get("key"),
        children=_dependency_nodes(definition.get("resolvedDependencies", []), built),
    )


def _dependency_nodes(deps: list[Mapping[str, Any]],
                      built: Mapping[str, LineageNode]) -> tuple[LineageNode, ...]:
    """The parents a statement lists; a merge read through a LoRA (two dependencies: the
    node naming its ``adapter``, and that adapter) becomes one ``"lora"`` stage."""
    adapters = {
        dep.get("name"): dep for dep in deps if (dep.get("annotations") or {}).get("kind") == "lora"
    }
    applied = {(dep.get("annotations") or {}).get("adapter") for dep in deps} & set(adapters)
    nodes = []
    for dep in deps:
        if dep.get("name") in applied:
            continue  # shown under the stage of the merge it applies to
        node = _dependency_node(dep, built)
        adapter = adapters.get((dep.get("annotations") or {}).get("adapter"))
        nodes.append(node if adapter is None else _adapted_node(node, adapter, built))
    return tuple(nodes)


def _adapted_node(model: LineageNode, adapter_dep: Mapping[str, Any],
                  built: Mapping[str, LineageNode]) -> LineageNode:
    annotations = adapter_dep.get("annotations") or {}
    reference = str(adapter_dep.get("name", "")).removesuffix("#adapter")
    adapter = _dependency_node(adapter_dep, built)
    uri = adapter.uri
    adapter = LineageNode(
        name=reference.partition("+")[2] or uri,
        kind="hub" if hub_id(uri) else "local",
        digest=adapter.digest,
        uri=uri,
        role="adapter",
        revision=adapter.revision,
        commit=adapter.commit,
    )
    return LineageNode(
        name=reference or f"{model.name}+{uri}",
        kind="lora",
        digest=str(annotations.get("adaptedDigest", "")),
        uri=f"{model.uri}+{uri}",
        method="lora",
        role=model.role,
        children=(replace(model, role="model"), adapter),
    )


def _dependency_node(dep: Mapping[str, Any], built: Mapping[str, LineageNode]) -> LineageNode:
    annotations = dep.get("annotations") or {}
    digests = {k: v for k, v in (dep.get("digest") or {}).items() if k != "gitCommit"}
    upstream = built.get(str(annotations.get("statementDigest")))
    common = {
        "name": str(dep.get("name") or dep.get("uri") or "?"),
        "kind": str(annotations.get("kind", "node" if upstream is not None else "local")),
        "digest": digest_string(digests) if digests else "",
        "uri": str(dep.get("uri", "")),
        "role": annotations.get("role"),
        "revision": annotations.get("revision"),
        "commit": annotations.get("commit"),
    }
    if upstream is not None:
        if isinstance(annotations.get("selection"), Mapping):
            common["name"] = upstream.name  # a sweep: the variant its select: chose
        return LineageNode(**common, method=upstream.method, params=upstream.params,
                           key=upstream.key, children=upstream.children)
    return LineageNode(**common, method=annotations.get("method"))


def load_lineage(directory: Path) -> LineageNode:
    """The lineage tree of a built model directory, from its ``provenance.json`` alone.

    Raises:
        StoreError: provenance is missing or invalid.
    """
    return lineage_from_statement(read_statement(Path(directory)))


def iter_lineage(node: LineageNode) -> Iterator[LineageNode]:
    """Every node of the tree, parents before children, each distinct model once.

    Models reached by several paths (a shared ancestor) are yielded the first time.
    """
    seen: set[tuple[str, str, str]] = set()
    stack: list[tuple[LineageNode, bool]] = [(node, False)]
    while stack:  # iterative: a chain may be far deeper than Python's recursion limit
        current, expanded = stack.pop()
        identity = (current.kind, current.uri, current.digest)
        if expanded:
            yield current
            continue
        if identity in seen:
            continue
        seen.add(identity)
        stack.append((current, True))
        stack.extend((child, False) for child in reversed(current.children))


def snapshot_repo(uri: str) -> tuple[str | None, str | None]:
    """(repo id, commit) of a ``file://`` URI inside a Hugging Face cache snapshot, else
    (None, None)."""
    found = parse_snapshot_path(unquote(urlparse(uri.split("+", 1)[0]).path))
    return found if found is not None else (None, None)


def lineage_hub_ids(node: LineageNode) -> list[str]:
    """Hub repo ids reached anywhere in the lineage (hub sources, and local sources that are
    Hugging Face cache snapshots), deduplicated and sorted."""
    ids = {hub_id(n.uri) for n in iter_lineage(node) if n.kind == "hub" or not n.is_build}
    return sorted((i for i in ids if i), key=lambda s: (s.lower(), s))


def lineage_methods(node: LineageNode) -> list[str]:
    """Merge methods used anywhere in the lineage, deduplicated and sorted."""
    return sorted({n.method for n in iter_lineage(node) if n.is_build and n.method})


def lineage_to_json(node: LineageNode) -> dict[str, Any]:
    """A JSON-ready dict of the tree; parents are under ``"parents"``."""
    out: dict[str, Any] = {
        "name": node.name,
        "kind": node.kind,
        "role": node.role,
        "uri": node.uri,
        "digest": node.digest,
    }
    if node.is_build:
        out.update(method=node.method, key=node.key, params=dict(node.params))
    elif node.method:
        out["method"] = node.method
    if node.kind == "hub":
        out.update(repo=hub_id(node.uri), revision=node.revision, commit=node.commit)
    if node.scores:
        out["scores"] = {name: dict(metrics) for name, metrics in node.scores.items()}
    out["parents"] = [lineage_to_json(c) for c in node.children]
    return out


def render_lineage_tree(node: LineageNode) -> Tree:
    """A ``rich`` tree of the lineage (rich is imported only here)."""
    from rich.tree import Tree

    tree = Tree(_label(node))

    def add(branch: Tree, n: LineageNode) -> None:
        for child in n.children:
            add(branch.add(_label(child)), child)

    add(tree, node)
    return tree


def _label(node: LineageNode) -> str:
    from rich.markup import escape

    return _stage_label(node) + (f" [green]{escape(_scores_text(node.scores))}[/]"
                                 if node.scores else "")


def _scores_text(scores: Mapping[str, Mapping[str, float]]) -> str:
    shown = [f"{name} {value:.4g}" if metric in ("accuracy", "perplexity")
             else f"{name}/{metric} {value:.4g}"
             for name, metrics in scores.items() for metric, value in metrics.items()
             if metric not in ("n", "tokens")]
    return "[" + ", ".join(shown) + "]"


def _stage_label(node: LineageNode) -> str:
    from rich.markup import escape

    role = f"[dim]({escape(node.role)})[/] " if node.role else ""
    digest = f"[dim]{escape(short_digest(node.digest))}[/]"
    if node.kind == "hub":
        at = f"@{node.revision}" if node.revision else ""
        commit = f" commit {node.commit[:12]}" if node.commit else ""
        repo = hub_id(node.uri) or node.uri
        return f"{role}[bold]{escape(node.name)}[/] hub {escape(repo + at)}{commit} {digest}"
    if not node.is_build:
        return f"{role}[bold]{escape(node.name)}[/] local {escape(node.uri)} {digest}"
    params = f" {escape(format_parameters(node.params))}" if node.params else ""
    method = escape(node.method or "?")
    return f"{role}[bold]{escape(node.name)}[/] [cyan]{method}[/]{params} {digest}"
