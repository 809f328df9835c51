"""Read a Mergefile (YAML) into typed specs; every error names file, line, node and a hint."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mergebuild.errors import GraphError, MergefileError, shorten
from mergebuild.io.chat_templates import NAMED_TEMPLATES, template_problem
from mergebuild.methods.registry import METHODS
from mergebuild.spec.card import SOURCE_CARD_KEYS, parse_card
from mergebuild.spec.evals import parse_checks, parse_eval_definitions, parse_node_evals
from mergebuild.spec.model import (
    DTYPE_ALIASES,
    AdaptedSpec,
    Defaults,
    DType,
    EvalSpec,
    Mergefile,
    MergeSpec,
    Node,
    ParentSpec,
    SearchSpec,
    SelectSpec,
    SliceSourceSpec,
    SliceSpec,
    SourceSpec,
    SweepSpec,
    TokenEmbeddingSpec,
    TokenizerSpec,
)
from mergebuild.spec.search import longest_trial_name, parse_search
from mergebuild.spec.sweep import (
    RETENTION,
    apply_point,
    grid_points,
    parse_select,
    split_select_metric,
)
from mergebuild.spec.validate import (
    DEFAULT_KEYS,
    MERGE_KEYS,
    PARENT_KEYS,
    SLICE_KEYS,
    SLICE_SOURCE_KEYS,
    SOURCE_KEYS,
    TOKEN_KEYS,
    TOKENIZER_KEYS,
    TOP_LEVEL_KEYS,
    check_keys,
    did_you_mean,
    validate_parameters,
)
from mergebuild.spec.yaml_lines import LineDict, line_of, load_yaml

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A node's record is refs/<id>/<name>.json, written through a temp file beside it: a name
# this long always fits a file name (255 bytes) and still reads in a terminal.
MAX_NODE_NAME = 128
MAX_DESCRIPTION = 10_000  # characters: a paragraph or a page, not a pasted file
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# A size is bytes, or a number and a unit: KB/MB/GB/TB count in powers of 1000 and
# KiB/MiB/GiB/TiB in powers of 1024 (the SI and IEC rules: "5GB" is 5,000,000,000 bytes).
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


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
    """Parse a Mergefile's ``text``; relative paths in it resolve against ``path``'s folder."""
    file = str(path)
    data = load_yaml(text, file)
    if data is None:
        raise MergefileError(
            "the Mergefile is empty", file=file, hint="add 'version: 1' and a 'models:' mapping"
        )
    if not isinstance(data, LineDict):
        raise MergefileError(
            "the Mergefile must be a mapping with 'version' and 'models'", file=file, line=1
        )
    check_keys(data, TOP_LEVEL_KEYS, "the Mergefile", file, None)
    version = data.get("version", 1)
    if version != 1:
        raise MergefileError(
            f"unsupported Mergefile version {shorten(version)}", file=file,
            line=data.line_of("version"),
            hint="this mergebuild reads version 1",
        )
    raw_defaults = data.get("defaults") or LineDict()
    if not isinstance(raw_defaults, LineDict):
        raise MergefileError("'defaults' must be a mapping", file=file,
                             line=data.line_of("defaults"))
    check_keys(raw_defaults, DEFAULT_KEYS, "defaults", file, None)
    models = data.get("models")
    if not isinstance(models, LineDict) or not models:
        raise MergefileError(
            "'models' must be a non-empty mapping of node names to nodes", file=file,
            line=data.line_of("models") if "models" in data else 1,
        )
    builder = _Builder(file, path.parent, models)
    builder.read_defaults(raw_defaults)
    builder.evals = parse_eval_definitions(data.get("evals"), file, data.line_of("evals"),
                                           path.parent)
    for name in models:
        builder.add(name)
    builder.check_sweep_children()
    card = None
    if data.get("card") is not None:
        card = parse_card(data["card"], file, data.line_of("card"), None)
    return Mergefile(path=path, text=text, version=1, defaults=builder.defaults,
                     nodes=builder.nodes, warnings=tuple(builder.warnings), card=card,
                     evals=builder.evals)


def parse_dtype(value: Any, file: str, line: int, node: str | None) -> DType:
    """A dtype as written (any alias, any case) → its one name; else a MergefileError."""
    if not isinstance(value, str) or value.lower() not in DTYPE_ALIASES:
        raise MergefileError(
            f"unsupported dtype {shorten(value)}", file=file, line=line, node=node,
            hint="use float32, float16 or bfloat16",
        )
    return DTYPE_ALIASES[value.lower()]


def parse_size(value: Any, file: str, line: int, key: str) -> int:
    """A byte count as written (``1000000``, ``500MB``, ``2GiB``) → bytes; else an error."""
    number: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        number = float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]
    if number is None or number < 1 or not float(number).is_integer():
        raise MergefileError(
            f"'{key}' must be a positive size, got {shorten(value)}", file=file, line=line,
            hint="write bytes (5000000000) or a size: 500MB or 5GB (powers of 1000), "
                 "2GiB (powers of 1024)",
        )
    return int(number)


def check_chat_template(value: Any, file: str, line: int, node: str) -> None:
    """A chat_template is a template name, ``auto`` or Jinja text; else a MergefileError."""
    problem = template_problem(value)
    if problem is not None:
        raise MergefileError(
            problem, file=file, line=line, node=node,
            hint=(did_you_mean(str(value), list(NAMED_TEMPLATES)) or "use auto, one of "
                  f"{', '.join(NAMED_TEMPLATES)}, or a Jinja template ({{% ... %}}, {{{{ ... }}}})"),
        )


def parse_device(value: Any, file: str, line: int) -> str:
    """A device as written; only the ones the engine can run on pass."""
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise MergefileError(
            f"unsupported device {shorten(value)}", file=file, line=line,
            hint="use auto, cpu, cuda, cuda:N or mps",
        )
    return value


class _Builder:
    def __init__(self, file: str, base_dir: Path, models: LineDict):
        self.file = file
        self.base_dir = base_dir
        self.models = models
        self.nodes: dict[str, Node] = {}
        self.defaults = Defaults()
        self.warnings: list[str] = []
        self.evals: dict[str, EvalSpec] = {}

    def error(self, message: str, line: int, node: str | None, hint: str | None = None):
        return MergefileError(message, file=self.file, line=line, node=node, hint=hint)

    def read_defaults(self, raw: LineDict) -> None:
        """``defaults:`` typed; an empty value (``device:``) means the default, as before."""
        dtype = device = size = tokenizer = None
        if "dtype" in raw:
            dtype = parse_dtype(raw["dtype"], self.file, raw.line_of("dtype"), None)
        if raw.get("device") is not None:
            device = parse_device(raw["device"], self.file, raw.line_of("device"))
        if raw.get("max_shard_size") is not None:
            size = parse_size(raw["max_shard_size"], self.file, raw.line_of("max_shard_size"),
                              "max_shard_size")
        if raw.get("tokenizer_source") is not None:
            tokenizer = self._tokenizer(raw["tokenizer_source"],
                                        raw.line_of("tokenizer_source"), None)
        self.defaults = Defaults(dtype=dtype, device=device or "auto", max_shard_size=size,
                                 tokenizer=tokenizer, written=raw)

    def add(self, name: str) -> None:
        line = self.models.line_of(name)
        number = self.models.written_as_number(name)
        if number is not None:
            raise self.error(
                f"node name {number} is read by YAML as the number {name}", line, None,
                f"quote it: '{number}': (or start it with a letter)")
        if not NODE_NAME.match(name) or ".." in name:
            raise self.error(
                f"invalid node name {shorten(name)}", line, None,
                "node names use letters, digits, '.', '_' and '-', no slashes or '..'",
            )
        if len(name) > MAX_NODE_NAME:
            raise self.error(
                f"node name {shorten(name, 40)} is {len(name)} characters long", line, None,
                f"use at most {MAX_NODE_NAME}")
        body = self.models[name]
        if not isinstance(body, LineDict):
            raise self.error(
                "a node must be a mapping with 'source:' or 'merge_method:'", line, name
            )
        description = body.get("description")
        if description is not None and (not isinstance(description, str)
                                        or len(description) > MAX_DESCRIPTION):
            raise self.error(
                f"'description' must be text of at most {MAX_DESCRIPTION:,} characters",
                body.line_of("description"), name, "write a paragraph, not a pasted file")
        if "source" in body:
            self.nodes[name] = self._source(name, body)
        elif "merge_method" in body and "sweep" in body and "search" in body:
            raise self.error("a node has either 'sweep' (a grid) or 'search' (a study), "
                             "not both", body.line_of("search"), name,
                             "keep sweep: to build every point, or search: to let a sampler "
                             "choose the points")
        elif "merge_method" in body and "sweep" in body:
            self._sweep(name, body)
        elif "merge_method" in body and "search" in body:
            self._search(name, body)
        elif "merge_method" in body:
            self.nodes[name] = self._merge(name, body)
        else:
            hint = "add 'source: ./path' for a model on disk, or 'merge_method:' for a merge"
            for key in body:
                if did_you_mean(key, ("source", "merge_method")):
                    hint = did_you_mean(key, ("source", "merge_method"))
                    break
            raise self.error("node has neither 'source' nor 'merge_method'", line, name, hint)

    # sources -------------------------------------------------------------------------
    def _source(self, name: str, body: LineDict) -> SourceSpec:
        check_keys(body, SOURCE_KEYS, "a source node", self.file, name)
        uri = body["source"]
        if not isinstance(uri, str) or not uri.strip():
            raise self.error("'source' must be a path, hf://org/name[@rev] or demo://name",
                             body.line_of("source"), name)
        allow_pickle = body.get("allow_pickle", False)
        if not isinstance(allow_pickle, bool):
            raise self.error("'allow_pickle' must be true or false", body.line_of("allow_pickle"),
                             name)
        license = None
        if body.get("card") is not None:
            license = parse_card(body["card"], self.file, body.line_of("card"), name,
                                 SOURCE_CARD_KEYS).license
        return SourceSpec(name=name, uri=self._source_uri(uri, body.line_of("source"), name),
                          line=body.line, allow_pickle=allow_pickle, license=license,
                          evals=parse_node_evals(body, self.evals, self.file, name))

    def _source_uri(self, uri: str, line: int, node: str | None) -> str:
        uri = uri.strip()
        if uri.startswith("hf://"):
            repo = uri[5:].split("@", 1)[0]
            if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", repo):
                raise self.error(f"invalid hub reference {shorten(uri)}", line, node,
                                 "write hf://org/name or hf://org/name@revision")
            return uri
        if uri.startswith("demo://"):
            return uri
        if "://" in uri:
            raise self.error(f"unsupported source {shorten(uri)}", line, node,
                             "use a local path, hf://org/name[@rev] or demo://name")
        return str((self.base_dir / Path(uri).expanduser()).resolve())

    def _implicit(self, ref: str, uri: str, line: int, node: str | None) -> str:
        """A parent written as a path or hub id becomes an implicit source node."""
        if ref not in self.nodes:
            self.nodes[ref] = SourceSpec(name=ref, uri=self._source_uri(uri, line, node),
                                         line=line, implicit=True)
        return ref

    def _ref(self, ref: Any, line: int, node: str | None) -> str:
        if not isinstance(ref, str) or not ref.strip():
            raise self.error(f"model reference must be a node name or a path, not {shorten(ref)}",
                             line, node)
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
        hint = did_you_mean(ref, list(self.models)) or (
            "name a node of this Mergefile, a path (./dir) or a hub id (hf://org/name)"
        )
        raise GraphError(f"unknown model {shorten(ref)}", file=self.file, line=line, node=node,
                         hint=hint)

    def _adapted(self, ref: str, line: int, node: str | None) -> str:
        """``model+lora``: the model's tensors get the adapter's delta as they stream.

        On a source model it is an implicit source (identity: model + adapter); on a merge
        node it is an :class:`AdaptedSpec`, a node of the graph that waits on the merge.
        """
        parts = [part.strip() for part in ref.split("+")]
        if not all(parts):
            raise self.error(f"cannot parse LoRA reference {shorten(ref)}", line, node,
                             "write MODEL+ADAPTER, e.g. base+./my-lora or base+hf://org/lora")
        if len(parts) > 2:
            raise self.error(f"{shorten(ref)} stacks two adapters", line, node,
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
    def _sweep(self, name: str, body: LineDict) -> None:
        """A merge with ``sweep:``: one variant node per point of the grid, and ``name``
        grouping them (identical points, after mergekit's precedence, are one variant)."""
        line = body.line_of("sweep")
        template = self._merge(name, body, validate=False)
        variants: dict[str, dict[str, Any]] = {}
        for point in grid_points(body["sweep"], self.file, line, name):
            variant = apply_point(template, point, self.file, line)
            if variant.name not in variants:
                for warning in validate_parameters(variant, METHODS[variant.method],
                                                   self.file):
                    if warning not in self.warnings:  # said once for the sweep
                        self.warnings.append(warning)
                variants[variant.name] = point
                self.nodes[variant.name] = variant
        select = None
        if body.get("select") is not None:
            select = parse_select(body["select"], self.file, body.line_of("select"), name)
            self.check_select_eval(select, body.line_of("select"), name)
        self.nodes[name] = SweepSpec(name=name, variants=tuple(variants),
                                     points=tuple(variants.values()), select=select,
                                     line=body.line)

    def _search(self, name: str, body: LineDict) -> None:
        """A merge with ``search:``: the node stands for the best of its trials, which the
        study creates as it runs (see spec/search.py)."""
        template = self._merge(name, body, validate=False)
        if not self.evals:
            raise self.error("a search ranks its trials by evaluations, and this Mergefile "
                             "has no 'evals:'", body.line_of("search"), name,
                             "define the evals select reads (see Mergefile.example)")
        select = None
        if body.get("select") is not None:
            select = parse_select(body["select"], self.file, body.line_of("select"), name)
            self.check_select_eval(select, body.line_of("select"), name)
        spec, warnings = parse_search(body["search"], template, select, self.file,
                                      body.line_of("search"))
        longest = longest_trial_name(spec)
        if longest > MAX_NODE_NAME:  # a trial's record is a file named for it, as a node's
            raise self.error(f"its trials' names would be up to {longest} characters long",
                             body.line_of("search"), name,
                             f"node names stay within {MAX_NODE_NAME}: search fewer "
                             "parameters, or give the node a shorter name")
        self.warnings.extend(w for w in warnings if w not in self.warnings)
        self.nodes[name] = spec

    def check_select_eval(self, select: SelectSpec, line: int, node: str) -> None:
        """``select`` names a defined eval (``EVAL`` or ``EVAL.METRIC``) and a score it gives."""
        if select.metric == RETENTION:
            return  # its ancestors' evals are checked once every node is read
        target = split_select_metric(select.metric, self.evals)
        if target is None:
            raise self.error(
                f"select: unknown eval '{select.metric}'", line, node,
                did_you_mean(select.metric, [*self.evals, RETENTION]) or (
                    f"define it under the top-level 'evals:' "
                    f"({', '.join(self.evals) or 'none yet'}), or select retention"))
        name, metric = target
        if metric is None:
            return
        try:
            direction = self.evals[name].definition.higher_is_better(metric)
        except KeyError:
            raise self.error(f"select: eval '{name}' gives no metric '{metric}'", line, node,
                             f"write select: {{{select.goal}: {name}}} for its one score"
                             ) from None
        if direction is None:
            raise self.error(f"select: '{metric}' of eval '{name}' is a count, not a score",
                             line, node, f"write select: {{{select.goal}: {name}}}")

    def check_select_retention(self) -> None:
        """``select: {maximize: retention}`` needs an ancestor of the sweep that declares evals
        (retention is a variant's score on them as a share of that ancestor's)."""
        for sweep in self.nodes.values():
            if not (isinstance(sweep, SweepSpec | SearchSpec) and sweep.select is not None
                    and sweep.select.metric == RETENTION):
                continue
            seen: set[str] = set()
            todo = (sweep.template.parent_refs() if isinstance(sweep, SearchSpec) else
                    [r for v in sweep.variants for r in self.nodes[v].parent_refs()])  # type: ignore[union-attr]
            scored = []
            while todo:
                ref = todo.pop()
                if ref in seen or ref not in self.nodes:
                    continue
                seen.add(ref)
                parent = self.nodes[ref]
                if isinstance(parent, SourceSpec) and parent.evals:
                    scored.append(ref)
                elif isinstance(parent, MergeSpec):
                    if parent.evals or parent.checks.bounds:
                        scored.append(ref)
                    todo.extend(parent.parent_refs())
                elif isinstance(parent, SweepSpec):
                    todo.extend(parent.variants)
                elif isinstance(parent, SearchSpec):
                    if parent.template.evals or parent.template.checks.bounds:
                        scored.append(ref)
                    todo.extend(parent.template.parent_refs())
                elif isinstance(parent, AdaptedSpec):
                    todo.append(parent.model)
            if not scored:
                raise self.error(
                    f"select: retention compares '{sweep.name}' with its ancestors' own evals, "
                    "and no ancestor declares evals", sweep.line, sweep.name,
                    "add evals: [...] to a parent, or select {maximize: EVAL}")

    def check_sweep_children(self) -> None:
        """A child of a sweep needs the sweep to say which variant it stands for."""
        self.check_select_retention()
        for node in self.nodes.values():
            if not isinstance(node, MergeSpec):
                continue
            for ref in node.parent_refs():
                sweep = self.nodes.get(ref)
                if isinstance(sweep, SweepSpec) and sweep.select is None:
                    raise self.error(
                        f"'{ref}' is a sweep of {len(sweep.variants)} variants and says "
                        "not which one its children use", node.line, node.name,
                        f"add select: {{maximize: METRIC}} to '{ref}', or use one variant, "
                        f"e.g. '{sweep.variants[0]}' as a node of its own")

    def _merge(self, name: str, body: LineDict, validate: bool = True) -> MergeSpec:
        if "modules" in body:
            raise self.error(
                "multi-module merges ('modules:') are not supported", body.line_of("modules"),
                name, "merge the whole model with 'models:' (every module gets the same "
                "method and parameters; use filters such as {filter: vision_tower, value: ...} "
                "for per-module values) or use mergekit for per-module slices")
        check_keys(body, MERGE_KEYS, "a merge node", self.file, name)
        if "select" in body and "sweep" not in body and "search" not in body:
            raise self.error("'select' chooses among a sweep's variants or a search's "
                             "trials; this node has no 'sweep' or 'search'",
                             body.line_of("select"), name,
                             "add sweep: {PARAMETER: [values...]} or remove select")
        method_name = body["merge_method"]
        line = body.line_of("merge_method")
        method = METHODS.get(method_name) if isinstance(method_name, str) else None
        if method is None:
            hint = did_you_mean(str(method_name), sorted(METHODS)) or (
                "run 'mergebuild methods' for the list"
            )
            raise self.error(f"unknown merge method {shorten(method_name)}", line, name, hint)

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
                entry_line = line_of(entry, body.line_of("models"))
                if isinstance(entry, str):
                    entry = LineDict(model=entry)
                    entry.line, entry.key_lines = entry_line, {}
                if not isinstance(entry, LineDict) or "model" not in entry:
                    raise self.error("each entry of 'models' needs 'model:'", entry_line, name)
                check_keys(entry, PARENT_KEYS, "a models entry", self.file, name)
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
                dtype = parse_dtype(body[key], self.file, body.line_of(key), name)
                break
        chat_template = body.get("chat_template")
        if chat_template is not None:
            check_chat_template(chat_template, self.file, body.line_of("chat_template"), name)
        allow_nonfinite = body.get("allow_nonfinite", False)
        if not isinstance(allow_nonfinite, bool):
            raise self.error("'allow_nonfinite' must be true or false",
                             body.line_of("allow_nonfinite"), name)
        spec = MergeSpec(
            name=name, method=method.name, base=base, models=tuple(models),
            parameters=global_params, slices=slices, dtype=dtype,
            tokenizer=self._node_tokenizer(body, name), chat_template=chat_template,
            line=body.line, allow_nonfinite=allow_nonfinite, written=body,
            evals=parse_node_evals(body, self.evals, self.file, name),
            checks=parse_checks(body, self.evals, self.file, name),
            card=(parse_card(body["card"], self.file, body.line_of("card"), name)
                  if body.get("card") is not None else None),
        )
        if validate:
            self.warnings.extend(validate_parameters(spec, method, self.file))
        self._check_tokens(spec)
        return spec

    def _node_tokenizer(self, body: LineDict, name: str) -> TokenizerSpec | None:
        """The node's own tokenizer_source/tokenizer, else the defaults' (unless the default
        names this very node: it keeps the tokenizer it is built with)."""
        raw = body.get("tokenizer_source", body.get("tokenizer"))
        if raw is None:
            default = self.defaults.tokenizer
            return default if default is not None and default.source != name else None
        key = "tokenizer_source" if "tokenizer_source" in body else "tokenizer"
        tokenizer = self._tokenizer(raw, body.line_of(key), name)
        block = body.get("tokenizer")
        if key == "tokenizer_source" and isinstance(block, dict):
            # Both written: the source is tokenizer_source's, padding and tokens the block's.
            _, pad, tokens = self._tokenizer_block(block, body.line_of("tokenizer"), name)
            tokenizer = TokenizerSpec(source=tokenizer.source, pad_to_multiple_of=pad,
                                      tokens=tokens)
        return tokenizer

    def _tokenizer(self, value: Any, line: int, node: str | None) -> TokenizerSpec:
        pad, tokens = None, ()
        if isinstance(value, dict):
            value, pad, tokens = self._tokenizer_block(value, line, node)
        if not isinstance(value, str):
            raise self.error("'tokenizer_source' must be 'base', 'union' or a model name", line,
                             node)
        source = value if value in ("base", "union") else self._ref(value, line, node)
        return TokenizerSpec(source=source, pad_to_multiple_of=pad, tokens=tokens)

    def _tokenizer_block(self, value: dict, line: int, node: str | None
                         ) -> tuple[Any, int | None, tuple[TokenEmbeddingSpec, ...]]:
        """A ``tokenizer: {source, pad_to_multiple_of, tokens}`` block → (source as written,
        padding, per-token embedding sources)."""
        extra = sorted(set(value) - set(TOKENIZER_KEYS))
        if extra:
            raise self.error(f"unknown key '{extra[0]}' in 'tokenizer'", line, node,
                             did_you_mean(extra[0], TOKENIZER_KEYS))
        pad = value.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise self.error("'pad_to_multiple_of' must be a positive whole number", line, node)
        raw_tokens = value.get("tokens") or {}
        if not isinstance(raw_tokens, dict):
            raise self.error("'tokens' must map each token to {source: ..., force: ...}",
                             line_of(raw_tokens, line), node)
        tokens = tuple(self._token(str(token), cfg, line_of(raw_tokens, line), node)
                       for token, cfg in raw_tokens.items())
        # "union": mergekit's default for a block
        return value.get("source", "union"), pad, tokens

    def _token(self, token: str, cfg: Any, line: int, node: str | None) -> TokenEmbeddingSpec:
        """One ``tokens:`` entry, as mergekit's TokenEmbeddingConfig reads it."""
        line = cfg.line if isinstance(cfg, LineDict) else line
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, dict):
            raise self.error(f"token {token!r}: write {{source: ..., force: true|false}}", line,
                             node)
        extra = sorted(set(cfg) - set(TOKEN_KEYS))
        if extra:
            raise self.error(f"unknown key '{extra[0]}' for token {token!r}", line, node,
                             did_you_mean(extra[0], TOKEN_KEYS) or "allowed: source, force")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise self.error(f"token {token!r}: 'force' must be true or false", line, node)
        source = cfg.get("source")
        if source is None:
            return TokenEmbeddingSpec(token=token, force=force)
        if isinstance(source, str):
            return TokenEmbeddingSpec(token=token, kind="model",
                                      model=self._ref(source, line, node), force=force)
        kind = source.get("kind") if isinstance(source, dict) else None
        if kind == "zero" and set(source) == {"kind"}:
            return TokenEmbeddingSpec(token=token, kind="zero", force=force)
        if kind == "model_token" and isinstance(source, dict) and "model" in source:
            extra = sorted(set(source) - {"kind", "model", "token", "token_id"})
            token_id, source_token = source.get("token_id"), source.get("token")
            if extra or (token_id is None) == (source_token is None) or (
                token_id is not None
                and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0)
            ):
                raise self.error(
                    f"token {token!r}: a model_token source names its model and exactly one "
                    "of token or token_id (a whole number ≥ 0)", line, node)
            return TokenEmbeddingSpec(
                token=token, kind="model_token", model=self._ref(source["model"], line, node),
                token_id=token_id, source_token=None if source_token is None else str(source_token),
                force=force)
        raise self.error(
            f"token {token!r}: unknown embedding source {source!r}", line, node,
            "write a model name, {kind: zero}, or {kind: model_token, model: M, token: T}")

    def _slices(self, name: str, body: LineDict) -> tuple[SliceSpec, ...]:
        raw = body["slices"]
        line = body.line_of("slices")
        if not isinstance(raw, list) or not raw:
            raise self.error("'slices' must be a non-empty list of {sources: [...]}", line, name)
        out: list[SliceSpec] = []
        for s in raw:
            s_line = line_of(s, line)
            if not isinstance(s, LineDict) or not isinstance(s.get("sources"), list) or not s[
                "sources"
            ]:
                raise self.error("each slice needs a non-empty 'sources:' list", s_line, name)
            check_keys(s, SLICE_KEYS, "a slice", self.file, name)
            if "residual_weight" in s:
                self.warnings.append(
                    f"{self.file}:{s.line_of('residual_weight')}: node '{name}': a slice's "
                    "'residual_weight' does nothing (mergekit 0.1.5 reads it nowhere); "
                    "accepted and left out of the recipe")
            slice_base = None
            if s.get("base_model") is not None:
                slice_base = self._ref(s["base_model"], s.line_of("base_model"), name)
            slice_params = s.get("parameters") or LineDict()
            if not isinstance(slice_params, dict):
                raise self.error("a slice's 'parameters' must be a mapping",
                                 s.line_of("parameters"), name)
            sources: list[SliceSourceSpec] = []
            for src in s["sources"]:
                src_line = line_of(src, s_line)
                if not isinstance(src, LineDict) or "model" not in src:
                    raise self.error("each slice source needs 'model:' and 'layer_range:'",
                                     src_line, name)
                check_keys(src, SLICE_SOURCE_KEYS, "a slice source", self.file, name)
                lr = src.get("layer_range")
                if (
                    not isinstance(lr, list) or len(lr) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
                    or lr[0] < 0 or lr[1] <= lr[0]
                ):
                    raise self.error(f"layer_range must be [start, end) with 0 <= start < end, "
                                     f"got {shorten(lr)}", src_line, name)
                params = src.get("parameters") or {}
                ref = self._ref(src["model"], src.line_of("model"), name)
                sources.append(SliceSourceSpec(ref=ref, layer_range=(lr[0], lr[1]),
                                               parameters=params, line=src_line))
            widths = {b - a for a, b in (x.layer_range for x in sources)}
            if len(widths) != 1:
                raise self.error("all sources of a slice must cover the same number of layers",
                                 s_line, name)
            out.append(SliceSpec(sources=tuple(sources), line=s_line, base=slice_base,
                                 parameters=slice_params))
        return tuple(out)

    def _check_tokens(self, spec: MergeSpec) -> None:
        """A token's embedding must come from a model the merge reads (mergekit's rule)."""
        if spec.tokenizer is None:
            return
        parents = {spec.base, *(p.ref for p in spec.models),
                   *(src.ref for s in spec.slices or () for src in s.sources)}
        for token in spec.tokenizer.tokens:
            if token.model is not None and token.model not in parents:
                raise self.error(
                    f"token {token.token!r} takes its embedding from '{token.model}', which "
                    "this merge does not read", spec.line_of("tokenizer"), spec.name,
                    "name one of the merge's models (or its base_model)")


