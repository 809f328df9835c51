"""The typed specs a Mergefile is read into: nodes, their parents, and the file's defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from mergebuild.io.dtypes import DTYPE_NAMES
from mergebuild.spec.card import CardSpec
from mergebuild.spec.yaml_lines import LineDict, plain

if TYPE_CHECKING:
    from mergebuild.evaluate.definition import EvalDefinition

DType = Literal["float32", "float16", "bfloat16"]
DTYPES: tuple[DType, ...] = get_args(DType)
# Every spelling a Mergefile (or a mergekit config) may use, folded to the one name kept.
DTYPE_ALIASES: Mapping[str, DType] = DTYPE_NAMES  # type: ignore[assignment]

SourceKind = Literal["local", "hub", "demo"]
# What a tokenizer source does to the vocabulary: keep the base's, take the union, or take
# one named model's ("model"; which model is the recipe's donor).
TokenizerPolicy = Literal["base", "union", "model"]
NodeKind = Literal["source", "merge", "adapted", "sweep", "search"]


def _uri_kind(uri: str) -> SourceKind:
    if uri.startswith("hf://"):
        return "hub"
    if uri.startswith("demo://"):
        return "demo"
    return "local"


@dataclass(frozen=True)
class SourceSpec:
    """A node whose weights come from outside: a local directory, the hub, or a demo model."""

    name: str
    uri: str  # absolute local path, "hf://org/name[@rev]" or "demo://<name>"
    line: int
    allow_pickle: bool = False
    implicit: bool = False  # created from a path/hub reference written as a parent
    adapter: str | None = None  # a PEFT LoRA applied on the fly ("model+lora" references)
    license: str | None = None  # its ``card: {license: …}``, for files that do not say
    evals: tuple[str, ...] = ()  # names of the Mergefile's evals this model is scored on

    @property
    def kind(self) -> SourceKind:
        return _uri_kind(self.uri)


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
    def adapter_kind(self) -> SourceKind:
        return _uri_kind(self.adapter)


TokenEmbeddingKind = Literal["zero", "model", "model_token"]


@dataclass(frozen=True)
class TokenEmbeddingSpec:
    """Where one token's embedding rows come from (mergekit's ``tokenizer.tokens`` entry).

    ``kind``: "zero" (zeros), "model" (that model's row of the same token) or "model_token"
    (that model's row of ``source_token``/``token_id``); None: mergekit's default rule.
    ``force``: use this source even where a parent has its own row for the token.
    """

    token: str
    kind: TokenEmbeddingKind | None = None
    model: str | None = None  # a node name
    token_id: int | None = None
    source_token: str | None = None
    force: bool = False

    def recipe(self, digest_of) -> dict[str, Any]:
        """This entry as recipe data (models by digest)."""
        return {"token": self.token, "kind": self.kind,
                "model": digest_of(self.model) if self.model else None,
                "token_id": self.token_id, "source_token": self.source_token,
                "force": self.force}


@dataclass(frozen=True)
class TokenizerSpec:
    """Where a merge's tokenizer (and so its embedding rows) comes from."""

    source: str  # "base", "union" or a node name
    pad_to_multiple_of: int | None = None
    tokens: tuple[TokenEmbeddingSpec, ...] = ()

    @property
    def policy(self) -> TokenizerPolicy:
        if self.source == "base" or self.source == "union":
            return self.source
        return "model"


@dataclass(frozen=True)
class Defaults:
    """The Mergefile's ``defaults:``, normalised: what a node gets unless it says otherwise."""

    dtype: DType | None = None
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    max_shard_size: int | None = None  # bytes
    tokenizer: TokenizerSpec | None = None  # applied to every merge node without its own
    # The block as written: the card's rebuild excerpt repeats it (never read for a build).
    written: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def plain(self) -> dict[str, Any]:
        """The ``defaults:`` block as written, as plain dicts (for a YAML excerpt)."""
        return plain(self.written) if self.written else {}


@dataclass(frozen=True)
class EvalSpec:
    """One named evaluation of the Mergefile's ``evals:`` (its definition typed and checked)."""

    name: str
    definition: EvalDefinition
    line: int


@dataclass(frozen=True)
class Bound:
    """An absolute gate on one metric of one eval: ``min <= value <= max``.

    ``metric`` None: the eval's one score (accuracy, perplexity, a command's single metric).
    """

    eval: str
    metric: str | None
    min: float | None
    max: float | None
    line: int


@dataclass(frozen=True)
class Checks:
    """A merge node's gates: keep ``retain`` of every ancestor's score on that ancestor's own
    evals (any number of stages up), and stay within absolute ``bounds``."""

    retain: float | None = None
    bounds: tuple[Bound, ...] = ()
    line: int = 0

    def __bool__(self) -> bool:
        return self.retain is not None or bool(self.bounds)


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
    base: str | None = None  # the slice's own base_model (mergekit: overrides the node's)
    parameters: Mapping[str, Any] = field(default_factory=dict)  # between sources' and node's


@dataclass(frozen=True)
class MergeSpec:
    """A node computed from other nodes by a merge method."""

    name: str
    method: str
    base: str | None
    models: tuple[ParentSpec, ...]
    parameters: Mapping[str, Any]
    slices: tuple[SliceSpec, ...] | None
    dtype: DType | None
    tokenizer: TokenizerSpec | None
    chat_template: str | None
    line: int
    evals: tuple[str, ...] = ()  # names of the Mergefile's evals this model is scored on
    checks: Checks = field(default_factory=Checks)
    # Merge parents holding NaN/Inf (and keep non-finite results) instead of failing.
    allow_nonfinite: bool = False
    # The node as written (a LineDict): for line numbers and plain(), never read outside spec/.
    written: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)
    # Hugging Face card metadata and text: presentation only, never part of the recipe.
    card: CardSpec | None = None

    @property
    def tokenizer_source(self) -> str | None:
        return self.tokenizer.source if self.tokenizer is not None else None

    def line_of(self, key: str) -> int:
        """The line of ``key`` in the node as written (the node's line if it is absent)."""
        return self.written.line_of(key) if isinstance(self.written, LineDict) else self.line

    def plain(self) -> dict[str, Any]:
        """The node as written, as plain dicts and lists (for a YAML excerpt)."""
        return plain(self.written)

    def parent_refs(self) -> list[str]:
        refs: list[str] = []
        if self.base:
            refs.append(self.base)
        refs.extend(p.ref for p in self.models)
        for s in self.slices or ():
            if s.base:
                refs.append(s.base)
            refs.extend(src.ref for src in s.sources)
        tokenizer = self.tokenizer
        if tokenizer and tokenizer.policy == "model" and not tokenizer.source.startswith("model:"):
            refs.append(tokenizer.source)
        if tokenizer:
            refs.extend(t.model for t in tokenizer.tokens if t.model)
        seen: dict[str, None] = {}
        for r in refs:
            seen.setdefault(r, None)
        return list(seen)


@dataclass(frozen=True)
class SelectSpec:
    """Which variant of a sweep its name stands for: the best by one metric."""

    goal: Literal["maximize", "minimize"]
    metric: str  # an evaluation's metric, or "retention"


@dataclass(frozen=True)
class SweepSpec:
    """A merge written once with a grid of values: one variant node per point.

    The variants are ordinary merge nodes (named ``blend[t=0.35,code.weight=1.0]``); this
    node groups them. ``make blend`` builds every variant (those sharing their parents in
    one pass); ``select`` says which variant ``blend`` stands for downstream.
    """

    name: str
    variants: tuple[str, ...]  # variant node names, in grid order (identical points once)
    points: tuple[Mapping[str, Any], ...]  # each variant's swept values, by path as written
    select: SelectSpec | None
    line: int


SamplerName = Literal["tpe", "cmaes", "random"]
SAMPLERS: tuple[SamplerName, ...] = get_args(SamplerName)


@dataclass(frozen=True)
class SearchDimension:
    """One axis of a search space: a float or int range (inclusive), or a list of choices."""

    path: str  # as in a sweep: ``density``, ``parameters.t``, ``models.math.weight``
    kind: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SearchSpec:
    """A merge written once with a space to search: Optuna proposes each trial's values.

    Every trial is an ordinary merge node named ``tuned[density=0.4137,math.weight=0.62]``,
    registered with the graph as the study reaches it (its values depend on the scores of
    the trials before it). ``select`` ranks the trials; ``tuned`` stands for the best one.
    """

    name: str
    template: MergeSpec  # the node as written; a trial sets its point's values on it
    sampler: SamplerName
    trials: int
    seed: int
    space: tuple[SearchDimension, ...]
    select: SelectSpec
    line: int


Node = SourceSpec | MergeSpec | AdaptedSpec | SweepSpec | SearchSpec


@dataclass(frozen=True)
class Mergefile:
    path: Path
    text: str
    version: int
    defaults: Defaults
    nodes: Mapping[str, Node]
    # What was accepted but does nothing (a parameter mergekit knows that this method
    # ignores, say): one line each, printed by the CLI, never part of a recipe.
    warnings: tuple[str, ...] = ()
    evals: Mapping[str, EvalSpec] = field(default_factory=dict)  # the named evaluations
    card: CardSpec | None = None  # the top-level ``card:``: every merge node's defaults

    def card_of(self, node: str) -> CardSpec | None:
        """``node``'s card block over the top-level one (None when neither says anything)."""
        spec = self.nodes.get(node)
        own = spec.card if isinstance(spec, MergeSpec) else None
        if own is None:
            return self.card
        return own.over(self.card)

    @property
    def directory(self) -> Path:
        return self.path.parent
