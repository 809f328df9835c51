"""Turn mergekit configs and mergekit-multi files into a Mergefile (version 1)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergebuild.errors import MergefileError, shorten
from mergebuild.io.chat_templates import template_problem
from mergebuild.methods.registry import METHODS
from mergebuild.spec.validate import MERGE_KEYS as _MERGEFILE_MERGE_KEYS
from mergebuild.spec.validate import known_parameter_names
from mergebuild.spec.yaml_lines import load_yaml_documents, plain

# mergekit's MergeConfiguration keys a merge node accepts verbatim (all of a Mergefile's
# merge keys but the mergebuild-only `description` and `allow_nonfinite`).
MERGE_KEYS = tuple(k for k in _MERGEFILE_MERGE_KEYS if k not in ("description", "allow_nonfinite"))
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NOT_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ImportResult:
    """The Mergefile text and what the user should know about the conversion."""

    text: str
    warnings: list[str] = field(default_factory=list)
    nodes: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Document:
    file: Path
    index: int
    name: str | None
    body: dict


class _Importer:
    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.sources: dict[str, dict] = {}  # node name → {"source": uri}
        self.by_uri: dict[str, str] = {}  # uri → node name
        self.merges: dict[str, dict] = {}
        self.merge_names: set[str] = set()
        self.warnings: list[str] = []

    # model references ------------------------------------------------------------------
    def _unique(self, wanted: str) -> str:
        base = _NOT_NAME.sub("-", wanted).strip("-.") or "model"
        if not base[0].isalnum():
            base = "m" + base
        name, n = base, 2
        while name in self.sources or name in self.merge_names:
            name, n = f"{base}-{n}", n + 1
        return name

    def _source_node(self, uri: str, wanted: str) -> str:
        if uri not in self.by_uri:
            name = self._unique(wanted)
            self.sources[name] = {"source": uri}
            self.by_uri[uri] = name
        return self.by_uri[uri]

    def _location(self, path: str, revision: str | None, where: str) -> tuple[str, str]:
        """(uri as written in the Mergefile, a name to derive the node's name from)."""
        expanded = os.path.expanduser(path)
        local = os.path.exists(expanded) or path.startswith(("/", "./", "../", "~"))
        if not local and _HUB_ID.match(path):
            uri = f"hf://{path}" + (f"@{revision}" if revision else "")
            return uri, path.rsplit("/", 1)[-1]
        if not local:
            self.warnings.append(f"{where}: '{path}' is neither an existing directory nor a hub "
                                 "id; kept as a local path")
        if revision:
            self.warnings.append(f"{where}: revision '{revision}' of local path '{path}' ignored")
        absolute = Path(expanded).resolve()
        try:
            rel = os.path.relpath(absolute, self.out_dir)
        except ValueError:  # another drive (Windows)
            rel = str(absolute)
        uri = rel if os.path.isabs(rel) else ("./" + rel if not rel.startswith("..") else rel)
        return uri, absolute.name

    def _path_and_revision(self, value: Any, where: str) -> tuple[str, str | None]:
        if isinstance(value, Mapping):
            path, revision = value.get("path"), value.get("revision")
        else:
            path, revision = value, None
        if not isinstance(path, str) or not path.strip():
            raise MergefileError(f"{where}: model reference must be a string, got {shorten(value)}")
        path = path.strip()
        if revision is None and "@" in path and not os.path.exists(path):
            path, revision = path.rsplit("@", 1)
        return path, revision

    def model_ref(self, value: Any, where: str) -> str:
        """A mergekit ModelReference → a Mergefile reference (node name, maybe +adapter)."""
        if isinstance(value, str):
            chunks = value.split("+")
            if len(chunks) > 2:
                raise MergefileError(f"{where}: cannot parse model reference '{value}'")
            model, lora = chunks[0], (chunks[1] if len(chunks) == 2 else None)
        elif isinstance(value, Mapping) and "model" in value:
            model, lora = value["model"], value.get("lora")
            if value.get("override_architecture"):
                self.warnings.append(f"{where}: override_architecture is not supported; dropped")
        else:
            raise MergefileError(f"{where}: cannot parse model reference {shorten(value)}")
        path, revision = self._path_and_revision(model, where)
        if path in self.merge_names and revision is None:
            node = path
        else:
            uri, wanted = self._location(path, revision, where)
            node = self._source_node(uri, wanted)
        if lora is None:
            return node
        lpath, lrev = self._path_and_revision(lora, where)
        luri, _ = self._location(lpath, lrev, where)
        return f"{node}+{luri}"

    # documents -------------------------------------------------------------------------
    def merge_node(self, doc: _Document, name: str) -> dict:
        where = f"{doc.file}" + (f" (document {doc.index + 1})" if doc.index else "")
        if "modules" in doc.body:
            raise MergefileError(
                "multi-module merges ('modules:') cannot be imported: mergebuild merges a "
                "model's modules together; write 'models:' (per-module values with filters "
                "such as {filter: vision_tower, value: ...}) or keep this merge in mergekit",
                file=str(doc.file))
        body: dict[str, Any] = {}
        for key, value in _unshared(doc.body).items():
            if key == "name":
                continue
            if key not in MERGE_KEYS:
                self.warnings.append(f"{where}: unknown mergekit key '{key}' dropped "
                                     "(mergekit ignores it too)")
                continue
            body[key] = value
        method = METHODS.get(body.get("merge_method"))  # an unknown method: plan says so
        if "base_model" in body and body["base_model"] is not None:
            body["base_model"] = self.model_ref(body["base_model"], where)
        self._parameters(body, "parameters", method, where, "the node", shared=True)
        for entry in body.get("models") or []:
            if isinstance(entry, dict) and "model" in entry:
                entry["model"] = self.model_ref(entry["model"], where)
                for key in list(entry):
                    if key not in ("model", "parameters"):
                        self.warnings.append(f"{where}: unknown key '{key}' in a models entry "
                                             "dropped")
                        del entry[key]
                self._parameters(entry, "parameters", method, where, "a models entry")
        for piece in body.get("slices") or []:
            if not isinstance(piece, dict):
                continue
            for key in list(piece):
                if key not in ("sources", "base_model", "parameters", "residual_weight"):
                    self.warnings.append(f"{where}: unknown key '{key}' in a slice dropped")
                    del piece[key]
            if piece.get("base_model") is not None:
                piece["base_model"] = self.model_ref(piece["base_model"], where)
            self._parameters(piece, "parameters", method, where, "a slice", shared=True)
            for src in piece.get("sources") or []:
                if isinstance(src, dict) and "model" in src:
                    src["model"] = self.model_ref(src["model"], where)
                    self._parameters(src, "parameters", method, where, "a slice source")
        tok = body.get("tokenizer_source")
        if isinstance(tok, (str, dict)) and tok not in ("base", "union"):
            body["tokenizer_source"] = self.model_ref(tok, where)
        tokenizer = body.get("tokenizer")
        if isinstance(tokenizer, dict):
            src = tokenizer.get("source", "union")
            if src not in ("base", "union"):
                tokenizer["source"] = self.model_ref(src, where)
            for cfg in (tokenizer.get("tokens") or {}).values():
                source = cfg.get("source") if isinstance(cfg, dict) else None
                if isinstance(source, (str, dict)) and not (
                    isinstance(source, dict) and source.get("kind") in ("zero", "model_token")
                ):
                    cfg["source"] = self.model_ref(source, where)
                elif isinstance(source, dict) and source.get("kind") == "model_token":
                    source["model"] = self.model_ref(source.get("model"), where)
        template = body.get("chat_template")
        if template is not None and template_problem(template) is not None:
            self.warnings.append(f"{where}: chat_template {template!r} dropped: it is neither a "
                                 "template name, auto, nor a Jinja template (mergekit fails on "
                                 "it)")
            del body["chat_template"]
        return body

    def _parameters(self, holder: dict, key: str, method: Any, where: str, what: str,
                    shared: bool = False) -> None:
        """Drop parameters mergekit would ignore that a Mergefile refuses: names no method
        knows, and (outside the node and slices) node-wide ones on a model."""
        params = holder.get(key)
        if not isinstance(params, dict):
            return
        known = known_parameter_names()
        for name in list(params):
            if name not in known:
                self.warnings.append(f"{where}: parameter '{name}' in {what} dropped (no merge "
                                     "method takes it; mergekit ignores it)")
                del params[name]
            elif not shared and method is not None and (p := method.param(name)) is not None \
                    and p.scope != "parent":
                self.warnings.append(f"{where}: node-wide parameter '{name}' in {what} dropped "
                                     "(mergekit reads it only from the node or a slice)")
                del params[name]
        if not params:
            del holder[key]


def _unshared(obj: Any) -> Any:
    """A copy with no shared parts: a YAML alias (``*slice``) becomes its own copy, so each
    use is converted once."""
    if isinstance(obj, dict):
        return {k: _unshared(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unshared(v) for v in obj]
    return obj


def _documents(files: list[Path]) -> list[_Document]:
    docs: list[_Document] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise MergefileError(f"cannot read {file}: {exc.strerror}", file=str(file)) from None
        # The Mergefile's loader: line numbers in errors, alias bombs refused.
        loaded = [plain(d) for d in load_yaml_documents(text, str(file)) if d is not None]
        for i, data in enumerate(loaded):
            if not isinstance(data, dict) or "merge_method" not in data:
                raise MergefileError("not a mergekit config (no 'merge_method')", file=str(file),
                                     hint=f"document {i + 1}")
            name = data.get("name")
            docs.append(_Document(file=file, index=i, name=str(name) if name else None,
                                  body=data))
    return docs


def import_mergekit(files: list[str | Path], out_dir: str | Path | None = None) -> ImportResult:
    """Convert mergekit configs (and mergekit-multi documents) into one Mergefile.

    Args:
        files: mergekit YAML files; each may hold several ``---``-separated documents, each
            with a ``name:`` (mergekit-multi); a later document may name an earlier one as a
            model.
        out_dir: where the Mergefile will live (local paths are written relative to it);
            the current directory by default.
    Returns:
        An :class:`ImportResult` with the Mergefile text and warnings (dropped keys).
    Example:
        >>> print(import_mergekit(["merge.yml"]).text)
    """
    paths = [Path(f) for f in files]
    importer = _Importer(Path(out_dir or ".").resolve())
    docs = _documents(paths)
    names: list[str] = []
    for doc in docs:
        wanted = doc.name or doc.file.stem
        if doc.name and doc.name in importer.merge_names:
            raise MergefileError(f"two mergekit documents are named '{doc.name}'",
                                 file=str(doc.file))
        name = doc.name if doc.name and _NOT_NAME.search(doc.name) is None else None
        if name is None:
            name = importer._unique(wanted)
            if doc.name:
                importer.warnings.append(f"{doc.file}: document '{doc.name}' renamed '{name}'")
        importer.merge_names.add(name)
        names.append(name)
        if doc.name:
            importer.merge_names.add(doc.name)
    renamed = {doc.name: name for doc, name in zip(docs, names, strict=True)
               if doc.name and doc.name != name}
    for doc, name in zip(docs, names, strict=True):
        body = importer.merge_node(doc, name)
        importer.merges[name] = _rename_refs(body, renamed)
    models: dict[str, Any] = {**importer.sources, **importer.merges}
    text = _render(models, paths)
    return ImportResult(text=text, warnings=importer.warnings, nodes=models)


def _rename_refs(obj: Any, renamed: Mapping[str, str]) -> Any:
    if not renamed:
        return obj
    if isinstance(obj, dict):
        return {k: (renamed.get(v, v) if k in ("model", "base_model", "source")
                    and isinstance(v, str) else _rename_refs(v, renamed)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rename_refs(v, renamed) for v in obj]
    return obj


def _render(models: Mapping[str, Any], files: list[Path]) -> str:
    header = "# Imported from mergekit config(s): " + ", ".join(str(f) for f in files) + "\n"
    body = yaml.safe_dump({"version": 1, "models": dict(models)}, sort_keys=False,
                          default_flow_style=False, allow_unicode=True, width=100)
    return header + body


__all__ = ["ImportResult", "import_mergekit"]
