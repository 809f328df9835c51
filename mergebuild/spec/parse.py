"""Read a Mergefile (YAML) into typed, validated node specs; every error names file, line, node."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergebuild.errors import GraphError, MergefileError
from mergebuild.io.dtypes import normalize_dtype_name
from mergebuild.methods.registry import METHODS, Method, Param

TOP_LEVEL_KEYS = ("version", "defaults", "models")
DEFAULT_KEYS = ("dtype", "device", "max_shard_size", "tokenizer_source")
SOURCE_KEYS = ("source", "description", "allow_pickle")
MERGE_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "slices",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "description",
)
PARENT_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources",)
SLICE_SOURCE_KEYS = ("model", "layer_range", "parameters")


NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --- YAML with line numbers -------------------------------------------------------------


class LineDict(dict):
    """A dict that remembers the line of each key (1-based) and of itself."""

    line: int = 0
    key_lines: dict

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, (str, int, float, bool)) or isinstance(key, bool):
            raise MergefileError(f"mapping key {key!r} must be a string", line=line)
        key = str(key)
        if key in result:
            raise MergefileError(
                f"duplicate key '{key}' (first at line {result.key_lines[key]})",
                line=line,
                hint="each name may appear once in a mapping",
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str, file: str) -> Any:
    try:
        return yaml.load(text, Loader=_LineLoader)
    except MergefileError as exc:
        exc.file = file
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MergefileError(
            f"YAML syntax error: {problem}", file=file, line=line, hint="fix the YAML syntax"
        ) from None


# --- specs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """A node whose weights come from outside: a local directory, the hub, or a demo model."""

    name: str
    uri: str  # absolute local path, "hf://org/name[@rev]" or "demo://<name>"
    line: int
    allow_pickle: bool = False
    implicit: bool = False  # created from a path/hub reference written as a parent
    adapter: str | None = None  # a PEFT LoRA applied on the fly ("model+lora" references)

    @property
    def kind(self) -> str:
        if self.uri.startswith("hf://"):
            return "hub"
        if self.uri.startswith("demo://"):
            return "demo"
        return "local"


@dataclass(frozen=True)
class AdaptedSpec:
    """A merge node's output read through a PEFT LoRA (a ``merge+lora`` parent reference).

    Nothing is built for it: the child that uses it reads ``model``'s build with the
    adapter's delta added while streaming. Its identity waits on ``model``'s digest.
    """

    name: str  # the reference as written, e.g. "chat-code+./style-lora"
    model: str  # the merge node whose output is adapted
    adapter: str  # absolute local path or "hf://org/adapter[@rev]"
    line: int
    implicit: bool = True

    @property
    def adapter_kind(self) -> str:
        if self.adapter.startswith("hf://"):
            return "hub"
        return "demo" if self.adapter.startswith("demo://") else "local"


@dataclass(frozen=True)
class ParentSpec:
    ref: str  # node name (after path references were turned into implicit source nodes)
    parameters: Mapping[str, Any]
    line: int


@dataclass(frozen=True)
class SliceSourceSpec:
    ref: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, Any]
    line: int


@dataclass(frozen=True)
class SliceSpec:
    sources: tuple[SliceSourceSpec, ...]
    line: int


@dataclass(frozen=True)
class MergeSpec:
    """A node computed from other nodes by a merge method."""

    name: str
    method: str
    base: str | None
    models: tuple[ParentSpec, ...]
    parameters: Mapping[str, Any]
    slices: tuple[SliceSpec, ...] | None
    dtype: str | None
    tokenizer_source: str | None
    chat_template: str | None
    line: int
    body: Mapping[str, Any] = field(repr=False, default_factory=dict)

    def parent_refs(self) -> list[str]:
        refs: list[str] = []
        if self.base:
            refs.append(self.base)
        refs.extend(p.ref for p in self.models)
        for s in self.slices or ():
            refs.extend(src.ref for src in s.sources)
        donor = self.tokenizer_source
        if donor and donor not in ("base", "union") and not donor.startswith("model:"):
            refs.append(donor)
        seen: dict[str, None] = {}
        for r in refs:
            seen.setdefault(r, None)
        return list(seen)


Node = SourceSpec | MergeSpec | AdaptedSpec


@dataclass(frozen=True)
class Mergefile:
    path: Path
    text: str
    version: int
    defaults: Mapping[str, Any]
    nodes: Mapping[str, Node]

    @property
    def directory(self) -> Path:
        return self.path.parent


# --- loading ----------------------------------------------------------------------------


def _did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def _check_keys(
    mapping: LineDict, allowed: tuple[str, ...], what: str, file: str, node: str | None
) -> None:
    for key in mapping:
        if key not in allowed:
            hint = _did_you_mean(key, allowed) or f"allowed keys: {', '.join(allowed)}"
            raise MergefileError(
                f"unknown key '{key}' in {what}", file=file, line=mapping.line_of(key), node=node,
                hint=hint,
            )


def _line(obj: Any, default: int) -> int:
    return obj.line if isinstance(obj, LineDict) else default


def load_mergefile(path: str | Path) -> Mergefile:
    """Read and validate a Mergefile.

    Args:
        path: the Mergefile's path.
    Returns:
        A validated :class:`Mergefile`; references are checked, cycles are checked by
        :mod:`mergebuild.spec.graph`.
    Example:
        >>> mf = load_mergefile("Mergefile.example")
    """
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergefileError(
            "no such Mergefile", file=file, hint="create one (see Mergefile.example) or pass -f FILE"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MergefileError(f"cannot read the Mergefile: {exc}", file=file) from None
    return parse_mergefile(text, path.resolve())


def parse_mergefile(text: str, path: Path) -> Mergefile:
    file = str(path)
    data = _load_yaml(text, file)
    if data is None:
        raise MergefileError(
            "the Mergefile is empty", file=file, hint="add 'version: 1' and a 'models:' mapping"
        )
    if not isinstance(data, LineDict):
        raise MergefileError(
            "the Mergefile must be a mapping with 'version' and 'models'", file=file, line=1
        )
    _check_keys(data, TOP_LEVEL_KEYS, "the Mergefile", file, None)
    version = data.get("version", 1)
    if version != 1:
        raise MergefileError(
            f"unsupported Mergefile version {version!r}", file=file, line=data.line_of("version"),
            hint="this mergebuild reads version 1",
        )
    defaults = data.get("defaults") or LineDict()
    if not isinstance(defaults, dict):
        raise MergefileError("'defaults' must be a mapping", file=file, line=data.line_of("defaults"))
    if isinstance(defaults, LineDict):
        _check_keys(defaults, DEFAULT_KEYS, "defaults", file, None)
    if "dtype" in defaults:
        _dtype(defaults["dtype"], file, _line(defaults, 1), None)
    models = data.get("models")
    if not isinstance(models, LineDict) or not models:
        raise MergefileError(
            "'models' must be a non-empty mapping of node names to nodes", file=file,
            line=data.line_of("models") if "models" in data else 1,
        )
    builder = _Builder(file, path.parent, models)
    for name in models:
        builder.add(name)
    return Mergefile(path=path, text=text, version=1, defaults=dict(defaults), nodes=builder.nodes)


def _dtype(value: Any, file: str, line: int, node: str | None) -> str:
    name = normalize_dtype_name(value) if isinstance(value, str) else None
    if name is None:
        raise MergefileError(
            f"unsupported dtype {value!r}", file=file, line=line, node=node,
            hint="use float32, float16 or bfloat16",
        )
    return name


class _Builder:
    def __init__(self, file: str, base_dir: Path, models: LineDict):
        self.file = file
        self.base_dir = base_dir
        self.models = models
        self.nodes: dict[str, Node] = {}

    def error(self, message: str, line: int, node: str | None, hint: str | None = None):
        return MergefileError(message, file=self.file, line=line, node=node, hint=hint)

    def add(self, name: str) -> None:
        line = self.models.line_of(name)
        if not NODE_NAME.match(name) or ".." in name:
            raise self.error(
                f"invalid node name '{name}'", line, None,
                "node names use letters, digits, '.', '_' and '-', no slashes or '..'",
            )
        body = self.models[name]
        if not isinstance(body, LineDict):
            raise self.error(
                "a node must be a mapping with 'source:' or 'merge_method:'", line, name
            )
        if "source" in body:
            self.nodes[name] = self._source(name, body)
        elif "merge_method" in body:
            self.nodes[name] = self._merge(name, body)
        else:
            hint = "add 'source: ./path' for a model on disk, or 'merge_method:' for a merge"
            for key in body:
                if _did_you_mean(key, ("source", "merge_method")):
                    hint = _did_you_mean(key, ("source", "merge_method"))
                    break
            raise self.error("node has neither 'source' nor 'merge_method'", line, name, hint)

    # sources -------------------------------------------------------------------------
    def _source(self, name: str, body: LineDict) -> SourceSpec:
        _check_keys(body, SOURCE_KEYS, "a source node", self.file, name)
        uri = body["source"]
        if not isinstance(uri, str) or not uri.strip():
            raise self.error("'source' must be a path, hf://org/name[@rev] or demo://name",
                             body.line_of("source"), name)
        allow_pickle = body.get("allow_pickle", False)
        if not isinstance(allow_pickle, bool):
            raise self.error("'allow_pickle' must be true or false", body.line_of("allow_pickle"),
                             name)
        return SourceSpec(name=name, uri=self._source_uri(uri, body.line_of("source"), name),
                          line=body.line, allow_pickle=allow_pickle)

    def _source_uri(self, uri: str, line: int, node: str) -> str:
        uri = uri.strip()
        if uri.startswith("hf://"):
            repo = uri[5:].split("@", 1)[0]
            if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", repo):
                raise self.error(f"invalid hub reference '{uri}'", line, node,
                                 "write hf://org/name or hf://org/name@revision")
            return uri
        if uri.startswith("demo://"):
            return uri
        if "://" in uri:
            raise self.error(f"unsupported source '{uri}'", line, node,
                             "use a local path, hf://org/name[@rev] or demo://name")
        return str((self.base_dir / Path(uri).expanduser()).resolve())

    def _implicit(self, ref: str, uri: str, line: int, node: str) -> str:
        """A parent written as a path or hub id becomes an implicit source node."""
        if ref not in self.nodes:
            self.nodes[ref] = SourceSpec(name=ref, uri=self._source_uri(uri, line, node),
                                         line=line, implicit=True)
        return ref

    def _ref(self, ref: Any, line: int, node: str) -> str:
        if not isinstance(ref, str) or not ref.strip():
            raise self.error(f"model reference must be a node name or a path, not {ref!r}", line,
                             node)
        ref = ref.strip()
        if ref in self.models:
            return ref
        if "+" in ref:
            return self._adapted(ref, line, node)
        if ref.startswith("hf://"):
            return self._implicit(ref, ref, line, node)
        if ref.startswith(("/", "./", "../", "~")):
            return self._implicit(ref, ref, line, node)
        if "/" in ref:
            if (self.base_dir / ref).exists():
                return self._implicit(ref, ref, line, node)
            if _HUB_ID.match(ref):
                return self._implicit(ref, f"hf://{ref}", line, node)
        hint = _did_you_mean(ref, list(self.models)) or (
            "name a node of this Mergefile, a path (./dir) or a hub id (hf://org/name)"
        )
        raise GraphError(f"unknown model '{ref}'", file=self.file, line=line, node=node,
                         hint=hint)

    def _adapted(self, ref: str, line: int, node: str) -> str:
        """``model+lora``: the model's tensors get the adapter's delta as they stream.

        On a source model it is an implicit source (identity: model + adapter); on a merge
        node it is an :class:`AdaptedSpec`, a node of the graph that waits on the merge.
        """
        parts = [part.strip() for part in ref.split("+")]
        if not all(parts):
            raise self.error(f"cannot parse LoRA reference '{ref}'", line, node,
                             "write MODEL+ADAPTER, e.g. base+./my-lora or base+hf://org/lora")
        if len(parts) > 2:
            raise self.error(f"'{ref}' stacks two adapters", line, node,
                             f"apply one adapter per reference; to stack them, merge "
                             f"'{parts[0]}+{parts[1]}' into a node of its own and adapt that")
        model, adapter = parts
        if ref in self.nodes:
            return ref
        parent = self._ref(model, line, node)
        spec = self.nodes.get(parent)
        body = self.models.get(parent) if spec is None else None
        if isinstance(body, LineDict) and "source" in body:
            spec = SourceSpec(name=parent, uri=self._source_uri(str(body["source"]),
                                                                body.line_of("source"), parent),
                              line=body.line, allow_pickle=bool(body.get("allow_pickle")))
        if adapter.startswith(("hf://", "demo://", "/", "./", "../", "~")) or (
            self.base_dir / adapter
        ).exists():
            adapter_uri = self._source_uri(adapter, line, node)
        elif _HUB_ID.match(adapter):
            adapter_uri = self._source_uri(f"hf://{adapter}", line, node)
        else:
            raise self.error(f"LoRA adapter '{adapter}' is neither a path nor a hub id", line,
                             node, "write ./path/to/adapter or hf://org/adapter")
        if isinstance(spec, SourceSpec):
            self.nodes[ref] = SourceSpec(name=ref, uri=spec.uri, line=line,
                                         allow_pickle=spec.allow_pickle, implicit=True,
                                         adapter=adapter_uri)
        else:  # a merge node, declared before or after this reference
            self.nodes[ref] = AdaptedSpec(name=ref, model=parent, adapter=adapter_uri, line=line)
        return ref

    # merges --------------------------------------------------------------------------
    def _merge(self, name: str, body: LineDict) -> MergeSpec:
        _check_keys(body, MERGE_KEYS, "a merge node", self.file, name)
        method_name = body["merge_method"]
        line = body.line_of("merge_method")
        method = METHODS.get(method_name) if isinstance(method_name, str) else None
        if method is None:
            hint = _did_you_mean(str(method_name), sorted(METHODS)) or (
                "run 'mergebuild methods' for the list"
            )
            raise self.error(f"unknown merge method '{method_name}'", line, name, hint)

        base = None
        if body.get("base_model") is not None:
            base = self._ref(body["base_model"], body.line_of("base_model"), name)
        global_params = body.get("parameters") or LineDict()
        if not isinstance(global_params, dict):
            raise self.error("'parameters' must be a mapping", body.line_of("parameters"), name)

        models: list[ParentSpec] = []
        raw_models = body.get("models")
        if raw_models is not None:
            if not isinstance(raw_models, list) or not raw_models:
                raise self.error("'models' must be a non-empty list of {model: NAME, parameters: "
                                 "{...}}", body.line_of("models"), name)
            for entry in raw_models:
                entry_line = _line(entry, body.line_of("models"))
                if isinstance(entry, str):
                    entry = LineDict(model=entry)
                    entry.line, entry.key_lines = entry_line, {}
                if not isinstance(entry, LineDict) or "model" not in entry:
                    raise self.error("each entry of 'models' needs 'model:'", entry_line, name)
                _check_keys(entry, PARENT_KEYS, "a models entry", self.file, name)
                params = entry.get("parameters") or LineDict()
                if not isinstance(params, dict):
                    raise self.error("'parameters' must be a mapping", entry_line, name)
                ref = self._ref(entry["model"], entry.line_of("model"), name)
                models.append(ParentSpec(ref=ref, parameters=params, line=entry_line))

        slices = None
        if body.get("slices") is not None:
            slices = self._slices(name, body)
            if models:
                raise self.error("use either 'models' or 'slices', not both",
                                 body.line_of("slices"), name)
        elif not models:
            raise self.error("a merge needs 'models:' (or 'slices:')", body.line, name)

        dtype = None
        for key in ("out_dtype", "dtype"):
            if body.get(key) is not None:
                dtype = _dtype(body[key], self.file, body.line_of(key), name)
                break
        tokenizer_source = body.get("tokenizer_source", body.get("tokenizer"))
        if tokenizer_source is not None:
            tokenizer_source = self._tokenizer_source(tokenizer_source, body, name)
        chat_template = body.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            raise self.error("'chat_template' must be a string", body.line_of("chat_template"),
                             name)
        spec = MergeSpec(
            name=name, method=method.name, base=base, models=tuple(models),
            parameters=global_params, slices=slices, dtype=dtype,
            tokenizer_source=tokenizer_source, chat_template=chat_template, line=body.line,
            body=body,
        )
        validate_parameters(spec, method, self.file)
        return spec

    def _tokenizer_source(self, value: Any, body: LineDict, name: str) -> str:
        line = body.line_of("tokenizer_source" if "tokenizer_source" in body else "tokenizer")
        if isinstance(value, dict):
            extra = sorted(set(value) - {"source", "pad_to_multiple_of"})
            if extra:
                hint = ("per-token embedding overrides are not supported" if "tokens" in extra
                        else _did_you_mean(extra[0], ("source", "pad_to_multiple_of")))
                raise self.error(f"unknown key '{extra[0]}' in 'tokenizer'", line, name, hint)
            pad = value.get("pad_to_multiple_of")
            if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
                raise self.error("'pad_to_multiple_of' must be a positive whole number", line,
                                 name)
            value = value.get("source", "union")  # mergekit's default for a tokenizer block
        if not isinstance(value, str):
            raise self.error("'tokenizer_source' must be 'base', 'union' or a model name", line,
                             name)
        if value in ("base", "union"):
            return value
        return self._ref(value, line, name)

    def _slices(self, name: str, body: LineDict) -> tuple[SliceSpec, ...]:
        raw = body["slices"]
        line = body.line_of("slices")
        if not isinstance(raw, list) or not raw:
            raise self.error("'slices' must be a non-empty list of {sources: [...]}", line, name)
        out: list[SliceSpec] = []
        for s in raw:
            s_line = _line(s, line)
            if not isinstance(s, LineDict) or not isinstance(s.get("sources"), list) or not s[
                "sources"
            ]:
                raise self.error("each slice needs a non-empty 'sources:' list", s_line, name)
            _check_keys(s, SLICE_KEYS, "a slice", self.file, name)
            sources: list[SliceSourceSpec] = []
            for src in s["sources"]:
                src_line = _line(src, s_line)
                if not isinstance(src, LineDict) or "model" not in src:
                    raise self.error("each slice source needs 'model:' and 'layer_range:'",
                                     src_line, name)
                _check_keys(src, SLICE_SOURCE_KEYS, "a slice source", self.file, name)
                lr = src.get("layer_range")
                if (
                    not isinstance(lr, list) or len(lr) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
                    or lr[0] < 0 or lr[1] <= lr[0]
                ):
                    raise self.error(f"layer_range must be [start, end) with 0 <= start < end, "
                                     f"got {lr!r}", src_line, name)
                params = src.get("parameters") or {}
                ref = self._ref(src["model"], src.line_of("model"), name)
                sources.append(SliceSourceSpec(ref=ref, layer_range=(lr[0], lr[1]),
                                               parameters=params, line=src_line))
            widths = {b - a for a, b in (x.layer_range for x in sources)}
            if len(widths) != 1:
                raise self.error("all sources of a slice must cover the same number of layers",
                                 s_line, name)
            out.append(SliceSpec(sources=tuple(sources), line=s_line))
        return tuple(out)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


# --- parameters -------------------------------------------------------------------------


def validate_parameters(spec: MergeSpec, method: Method, file: str) -> None:
    """Check parameter names, scopes, kinds and ranges against the method's schema."""
    names = [p.name for p in method.params]
    body = spec.body
    g_line = body.line_of("parameters") if isinstance(body, LineDict) else spec.line

    def unknown(key: str, line: int, where: str) -> MergefileError:
        hint = _did_you_mean(key, names) or (
            f"{method.name} takes: {', '.join(names)}" if names else f"{method.name} takes none"
        )
        return MergefileError(f"unknown parameter '{key}' {where} for {method.name}", file=file,
                              line=line, node=spec.name, hint=hint)

    for key, value in spec.parameters.items():
        line = spec.parameters.line_of(key) if isinstance(spec.parameters, LineDict) else g_line
        param = method.param(key)
        if param is None:
            raise unknown(key, line, "in 'parameters'")
        _check_value(param, value, file, line, spec.name)

    entries: list[tuple[Mapping[str, Any], int]] = [(p.parameters, p.line) for p in spec.models]
    for s in spec.slices or ():
        entries.extend((src.parameters, src.line) for src in s.sources)
    for params, line in entries:
        for key, value in params.items():
            kline = params.line_of(key) if isinstance(params, LineDict) else line
            param = method.param(key)
            if param is None:
                raise unknown(key, kline, "in a models entry")
            if param.scope != "parent":
                raise MergefileError(
                    f"'{key}' is a node-wide parameter of {method.name}", file=file, line=kline,
                    node=spec.name, hint="move it to the node's 'parameters:'",
                )
            _check_value(param, value, file, kline, spec.name)

    taking_part = participants(spec, method)
    base_line = body.line_of("base_model") if isinstance(body, LineDict) else spec.line
    if method.base == "required" and spec.base is None:
        raise MergefileError(f"{method.name} needs a base_model", file=file, line=spec.line,
                             node=spec.name, hint="add 'base_model: NODE'")
    if spec.slices is None:
        count = len(taking_part)
        if count < method.min_parents or (method.max_parents and count > method.max_parents):
            expected = (
                f"exactly {method.min_parents}" if method.min_parents == method.max_parents
                else f"at least {method.min_parents}" if not method.max_parents
                else f"{method.min_parents} to {method.max_parents}"
            )
            extra = " besides the base_model" if method.base == "required" else ""
            noun = "model" if method.max_parents == 1 else "models"
            raise MergefileError(
                f"{method.name} takes {expected} {noun}{extra}, got {count}", file=file,
                line=base_line if count == 0 else spec.models[0].line, node=spec.name,
                hint="check 'models:' and 'base_model:'",
            )
    for param in method.params:
        if not param.required:
            continue
        if param.scope == "global" and param.name not in spec.parameters:
            raise MergefileError(f"{method.name} needs parameter '{param.name}'", file=file,
                                 line=g_line, node=spec.name,
                                 hint=f"add '{param.name}:' under 'parameters:'")
        if param.scope == "parent" and param.name not in spec.parameters:
            for entry in spec.models:
                if entry.ref == arithmetic_base(spec.base, method):
                    continue
                if param.name not in entry.parameters:
                    raise MergefileError(
                        f"model '{entry.ref}' needs parameter '{param.name}'", file=file,
                        line=entry.line, node=spec.name,
                        hint=f"add 'parameters: {{{param.name}: ...}}' to that models entry",
                    )


def arithmetic_base(base: str | None, method: Method) -> str | None:
    """The base model as the method uses it: None without one or for a base-free method."""
    return base if base and method.base != "none" else None


def participants(spec: MergeSpec, method: Method) -> list[tuple[str, Mapping[str, Any]]]:
    """(parent node, its raw parameters) for each listed model that takes part in the
    arithmetic besides the base, which is passed apart (see :func:`arithmetic_base`)."""
    base = arithmetic_base(spec.base, method)
    return [(p.ref, p.parameters) for p in spec.models if base is None or p.ref != base]


def _check_value(param: Param, value: Any, file: str, line: int, node: str) -> None:
    def fail(msg: str, hint: str | None = None) -> MergefileError:
        return MergefileError(f"parameter '{param.name}' {msg}", file=file, line=line, node=node,
                              hint=hint)

    if isinstance(value, list):
        if not param.varies:
            raise fail("does not vary by layer or tensor; give one value")
        if not value:
            raise fail("is an empty list")
        if all(isinstance(v, dict) for v in value):
            for entry in value:
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    raise fail("filter entries are {filter: SUBSTRING, value: VALUE}")
                if "filter" in entry and not isinstance(entry["filter"], str):
                    raise fail("'filter' must be a substring of tensor names")
                _check_value(param, entry["value"], file, line, node)
            return
        if param.kind in ("bool", "choice"):
            # Interpolating between true/false or between choices means nothing.
            raise fail(f"is a {param.kind} and takes no gradient",
                       "give one value, or a list of {filter: SUBSTRING, value: VALUE}")
        for v in value:
            if isinstance(v, (list, dict)):
                raise fail("gradients are flat lists of numbers")
            _check_scalar(param, v, fail)
        return
    if isinstance(value, dict):
        raise fail("must be a value, a list (gradient) or a list of {filter, value}")
    _check_scalar(param, value, fail)


def _check_scalar(param: Param, value: Any, fail) -> None:
    if param.kind == "bool":
        if not isinstance(value, bool):
            raise fail(f"must be true or false, got {value!r}")
        return
    if param.kind == "choice":
        if value not in param.choices:
            raise fail(f"must be one of {', '.join(map(str, param.choices))}, got {value!r}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"must be a number, got {value!r}")
    if param.kind == "int" and not float(value).is_integer():
        raise fail(f"must be a whole number, got {value!r}")
    if math.isnan(value):
        raise fail("must not be NaN")
    lo, hi = param.minimum, param.maximum
    if lo is not None and (value < lo or (param.min_exclusive and value == lo)):
        raise fail(f"must be {'>' if param.min_exclusive else '>='} {lo}, got {value!r}")
    if hi is not None and (value > hi or (param.max_exclusive and value == hi)):
        raise fail(f"must be {'<' if param.max_exclusive else '<='} {hi}, got {value!r}")
