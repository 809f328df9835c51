"""The single list of merge methods: schema, kernels and capabilities (importable without torch).

Each method is one declaration: its parameters, when to use it, and what it can do. Kernels
are named as ``"module:function"`` and imported only when a tensor is actually merged, so
validating and planning a Mergefile never imports torch.

The whole-tensor kernel (``kernel``) has the signature::

    def merge(parents: list[Tensor], base: Tensor | None, params: TensorParams,
              generator: torch.Generator | None) -> Tensor

``parents`` are float32 tensors of the participating models, aligned with
``params.parents``; ``base`` is the float32 base tensor (None when the method takes no
base or none was given); ``generator`` is a CPU generator seeded by (node key, tensor
name) for randomised methods, None otherwise. The function returns a float32 tensor of
the same shape; it may modify its inputs in place (the engine never reuses them).

The streamed kernel (``streamed``), one signature for every method that has one::

    def merge(parents: list[Tensor], base: Tensor, params: TensorParams, seed: int | None,
              out: Tensor, workspace: ChunkWorkspace, consumed=None) -> None

reads flat parents of any float dtype (mmap views, say) a chunk at a time and writes the
flat ``out``, bit for bit the whole-tensor kernel's result cast to ``out``'s dtype;
``consumed(start, stop)`` is called once a span of the inputs is read for the last time and
the same span of ``out`` (of every ``outs[i]`` below) is written: the engine then checks that
span of the output for NaN/Inf while it is in cache, and drops the inputs' pages.

The streamed kernel for several variants (``streamed_many``), for sweeps built in one pass::

    def merge(parents: list[Tensor], base: Tensor, params: list[TensorParams],
              seeds: list[int | None], outs: list[Tensor], workspace: ChunkWorkspace,
              consumed=None) -> None

writes ``outs[i]`` bit for bit as the streamed kernel would with ``params[i]`` and
``seeds[i]``, sharing what does not depend on the parameters (reading and converting the
inputs, statistics such as norms or magnitude histograms).

The elementwise kernel for several variants (``elementwise_many``), for an elementwise
method's sweeps built in one pass::

    def merge(parents: list[Tensor], base: Tensor | None, params: list[TensorParams],
              outs: list[Tensor], scratch: Tensor) -> None

gets one float32 chunk of each input (shared by the variants: never modified) and writes
into ``outs[i]`` (same length, any dtype) what the whole-tensor kernel returns for
``params[i]``, cast, bit for bit; ``scratch`` is a float32 buffer of the chunk's length.

A method's bound on its values (``bound``), from the magnitudes of its inputs::

    def bound(parents: list[float], base: float | None, params: TensorParams) -> float | None

gets the largest |x| of each parent's tensor (and of the base's, or None) and returns a
number that no value the kernels compute for ``params`` exceeds in exact arithmetic,
intermediates included, or None where it knows none (it raises ValueError for parameters the
kernels reject). The engine reads the parents' magnitudes off their own NaN/Inf check, for
free, and skips the check of an output whose bound, doubled, stays below the output dtype's
largest finite value and float32's (the doubling covers the float32 rounding).

A family member (a method with ``settings``) gets its declaration as the keyword argument
``method`` of its kernels and of its bound, and reads its knobs from ``method.settings``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One parameter of a method.

    ``scope`` is "parent" for per-model parameters (weight, density) and "global" for
    node-wide ones; a per-parent parameter may also be given in the node's global
    ``parameters`` as the default for every parent (mergekit's precedence).
    ``varies`` says whether the value may be a gradient list or ``{filter, value}`` list.
    """

    name: str
    kind: str  # "float" | "int" | "bool" | "choice"
    default: Any = REQUIRED
    scope: str = "global"
    varies: bool = True
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False
    choices: tuple[Any, ...] = ()
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved to plain scalars for one output tensor."""

    tensor_name: str
    globals: Mapping[str, Any]
    parents: tuple[Mapping[str, Any], ...]


Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della"]
RescaleMode = Literal["l1", "inverse_density", "none"]

_RESCALE_MODES: dict[Any, RescaleMode] = {
    True: "l1",
    False: "none",
    "l1": "l1",
    "inverse_density": "inverse_density",
    "none": "none",
}


def rescale_mode(value: Any) -> RescaleMode:
    """Map a ``rescale`` setting to "l1", "inverse_density" or "none" (bools as mergekit)."""
    try:
        return _RESCALE_MODES[value]
    except (KeyError, TypeError):
        raise ValueError(
            f"rescale must be true, false, 'l1', 'inverse_density' or 'none', got {value!r}"
        ) from None


@dataclass(frozen=True)
class TaskVectorSettings:
    """What sets one member of the task-arithmetic family apart from the others.

    ``sparsifier`` drops entries of each task vector before they are added: ``magnitude``
    (TIES: keep the top density by |δ|), ``random`` (DARE: keep with p = density),
    ``magnitude_outliers`` (breadcrumbs: drop the top gamma, keep the next density),
    ``della`` (per row, keep p rising with the magnitude rank); None keeps everything.
    ``consensus``: whether each entry's sign is elected (the vote is the ``consensus``
    parameter, sum or count) and only the agreeing task vectors are added.
    """

    sparsifier: Sparsifier | None
    consensus: bool

    @property
    def ranks_magnitudes(self) -> bool:
        """Whether the sparsifier keeps a range of magnitude ranks (TIES, breadcrumbs)."""
        return self.sparsifier in ("magnitude", "magnitude_outliers")

    def streamable(self, method: Method, params: TensorParams) -> bool:
        """A magnitude cut with an l1 rescale needs whole tensors (the streamed passes take
        the cut before the norms are known)."""
        if self.ranks_magnitudes:
            return rescale_mode(method.value(params.globals, "rescale")) != "l1"
        return True


@dataclass(frozen=True)
class Method:
    """A registered merge method: schema, kernels and what the engine may do with them.

    ``base``: "none" (a base_model only donates config/tokenizer; every listed model
    participates), "required" (participants are the listed models other than the base),
    or "optional" (as "required" when a base is given, else as "none").
    ``kernel``: the whole-tensor kernel; ``streamed``: the chunked one (None: none), whose
    results are defined over chunks of ``stream_chunk`` elements (None: any chunking).
    ``streamed_many``: the streamed kernel for several parameter sets over the same inputs
    (a sweep's variants in one pass; None: the engine runs ``streamed`` once per variant).
    ``elementwise``: each output element depends only on the same element of the inputs,
    so the engine may merge any slices of the tensors separately.
    ``elementwise_many``: an elementwise method's kernel for several parameter sets over
    the same chunks (None: the engine runs ``kernel`` once per variant, on copies).
    ``passes_through``: the result is the one parent's tensor times its ``scale``, so the
    engine hands unscaled tensors to the writer as they are.
    ``bound``: ``bound(parents, base, params)``, given the largest |x| of each parent's
    tensor (and the base's, or None), a bound on the magnitude of every value the kernel
    computes, intermediates included, in exact arithmetic (None: no bound for these
    parameters). The engine skips the NaN/Inf check of an output it proves finite.
    ``settings``: a family member's knobs, read by the family's kernels.
    """

    name: str
    summary: str
    when_to_use: str
    kernel: str  # "module:function"
    base: str = "none"
    params: tuple[Param, ...] = ()
    min_parents: int = 1
    max_parents: int | None = None
    randomized: bool = False
    aliases: tuple[str, ...] = field(default=())
    streamed: str | None = None  # "module:function"
    streamed_many: str | None = None  # "module:function": several variants in one pass
    stream_chunk: int | None = None
    elementwise: bool = False
    elementwise_many: str | None = None  # "module:function": several variants per chunk
    passes_through: bool = False
    bound: str | None = None  # "module:function": a bound on the merge's magnitudes
    settings: TaskVectorSettings | None = None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def value(self, values: Mapping[str, Any], name: str) -> Any:
        """The value of parameter ``name`` in ``values``, else its default."""
        if name in values and values[name] is not None:
            return values[name]
        param = self.param(name)
        if param is None or param.required:
            raise ValueError(f"{self.name}: missing required parameter {name!r}")
        return param.default

    def load(self) -> Callable[..., Any]:
        """The whole-tensor kernel."""
        return self._import(self.kernel)

    def load_streamed(self) -> Callable[..., Any]:
        """The streamed kernel (the method must have one)."""
        if self.streamed is None:
            raise ValueError(f"{self.name} has no streamed kernel")
        return self._import(self.streamed)

    def load_streamed_many(self) -> Callable[..., Any] | None:
        """The streamed kernel for several variants in one pass, if the method has one."""
        return self._import(self.streamed_many) if self.streamed_many else None

    def load_elementwise_many(self) -> Callable[..., Any] | None:
        """The elementwise kernel for several variants over the same chunks, if any."""
        return self._import(self.elementwise_many) if self.elementwise_many else None

    def load_bound(self) -> Callable[..., Any] | None:
        """The method's bound on its values from the parents' magnitudes, if it has one."""
        return self._import(self.bound) if self.bound else None

    def _import(self, path: str) -> Callable[..., Any]:
        module, _, attr = path.partition(":")
        function = getattr(importlib.import_module(module), attr)
        return partial(function, method=self) if self.settings is not None else function

    def streamable(self, params: TensorParams) -> bool:
        """Whether the streamed kernel computes a tensor with these parameters: it has one,
        every required node-wide parameter has a value, and the settings allow it."""
        if self.streamed is None:
            return False
        if any(p.required and p.scope == "global" and params.globals.get(p.name) is None
               for p in self.params):
            return False
        return self.settings is None or self.settings.streamable(self, params)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    for name in (method.name, *method.aliases):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = method
    return method


# --- core methods (methods-A) ---
# Names, defaults and scopes follow mergekit 0.1.5 (merge_methods/registry.py); mergekit
# gives no ranges, so only the meaningful ones are enforced here. mergekit's `int8_mask`
# is a memory knob with no effect on results: it is not a parameter here (a Mergefile may
# still write it; spec/validate.py warns and leaves it out of the recipe).


def _core_weight() -> Param:
    return Param("weight", "float", scope="parent", help="relative weight of this model")


def _core_density() -> Param:
    return Param("density", "float", default=1.0, scope="parent", minimum=0.0, maximum=1.0,
                 help="fraction of the task vector to keep")


_FAMILY_WHOLE = "mergebuild.methods.task_arithmetic.whole:merge"
_FAMILY_STREAMED = "mergebuild.methods.task_arithmetic.streamed:merge"
_FAMILY_STREAMED_MANY = "mergebuild.methods.task_arithmetic.streamed:merge_many"
_FAMILY_BOUND = "mergebuild.methods.task_arithmetic.whole:bound"


def _task_vector_member(
    name: str, summary: str, when_to_use: str, *, sparsifier: Sparsifier | None,
    consensus: bool, normalize: bool, rescale: bool = False,
) -> Method:
    """One member of the task-arithmetic family: its settings decide its parameters, its
    randomness and whether it streams (``rescale`` is the default rescale, on as l1)."""
    # Plain task arithmetic does not sparsify, so `density` and `rescale` (accepted and
    # ignored by mergekit) would do nothing and are refused.
    params = [_core_weight()] + ([_core_density()] if sparsifier else []) + [
        Param("normalize", "bool", default=normalize,
              help="divide by the sum of the weights (of the agreeing models with consensus)"),
        Param("lambda", "float", default=1.0, help="scale of the merged task vector"),
    ]
    if sparsifier:
        params.append(Param(
            "rescale", "choice", default="l1" if rescale else "none",
            choices=("l1", "inverse_density", "none", True, False),
            help="after dropping: l1 (mergekit) restores the L1 norm, inverse_density "
                 "(DARE paper, PEFT) divides by the keep probability, none; true means l1 "
                 "and false none, as in mergekit",
        ))
    if consensus:
        params.append(Param(
            "consensus", "choice", default="sum", choices=("sum", "count"),
            help="elect each entry's sign by the sum of the weighted task vectors (mergekit) "
                 "or by the count of signs (the TIES paper's variant)",
        ))
    if sparsifier == "magnitude_outliers":
        params.append(Param("gamma", "float", default=0.01, scope="parent", minimum=0.0,
                            maximum=1.0, help="fraction of largest-magnitude outliers to drop"))
    if sparsifier == "della":
        params.append(Param("epsilon", "float", default=0.15, scope="parent", minimum=0.0,
                            maximum=0.5, max_exclusive=True,
                            help="spread of keep probabilities around density "
                                 "(density ± epsilon must lie in (0, 1))"))
    return Method(
        name=name,
        summary=summary,
        when_to_use=when_to_use,
        kernel=_FAMILY_WHOLE,
        # DELLA ranks each row and draws torch's generator row block by row block: whole only.
        streamed=None if sparsifier == "della" else _FAMILY_STREAMED,
        streamed_many=None if sparsifier == "della" else _FAMILY_STREAMED_MANY,
        bound=_FAMILY_BOUND,
        # Without a sparsifier each output element depends only on the same inputs' elements.
    elementwise=sparsifier is None,
        base="required",
        params=tuple(params),
        randomized=sparsifier in ("random", "della"),
        settings=TaskVectorSettings(sparsifier=sparsifier, consensus=consensus),
    )


register(Method(
    name="linear",
    summary="weighted average of the models",
    when_to_use="model soups: average fine-tunes of one base (weights normalised by default)",
    kernel="mergebuild.methods.linear:merge_linear",
    elementwise=True,
    elementwise_many="mergebuild.methods.linear:merge_linear_many",
    bound="mergebuild.methods.linear:linear_bound",
    params=(
        _core_weight(),
        Param("normalize", "bool", default=True, help="divide by the sum of the weights"),
    ),
))
register(Method(
    name="slerp",
    summary="spherical interpolation from the base_model (t = 0) to one other model (t = 1)",
    when_to_use="blend exactly two models smoothly; `t` may follow a per-layer gradient",
    kernel="mergebuild.methods.slerp:merge_slerp",
    streamed="mergebuild.methods.slerp:merge_slerp_streamed",
    streamed_many="mergebuild.methods.slerp:merge_slerp_streamed_many",
    stream_chunk=1 << 20,  # slerp.CHUNK_ELEMENTS: the chunks its dot products are taken over
    bound="mergebuild.methods.slerp:slerp_bound",
    base="required",
    params=(Param("t", "float", help="interpolation factor; 0 is the base_model"),),
    min_parents=1,
    max_parents=1,
))
register(_task_vector_member(
    "task_arithmetic", "base + λ·Σ w_i·(x_i − base)",
    "add task vectors (model − base) with weights; `lambda` scales the sum",
    sparsifier=None, consensus=False, normalize=False,
))
register(_task_vector_member(
    "ties", "task vectors trimmed to their top density by magnitude, sign consensus",
    "combine several experts: keep each one's largest changes, resolve sign conflicts",
    sparsifier="magnitude", consensus=True, normalize=True,
))
register(_task_vector_member(
    "dare_linear", "task vectors randomly dropped (keep p = density) and rescaled",
    "many similar fine-tunes: task arithmetic with random dropping",
    sparsifier="random", consensus=False, normalize=False, rescale=True,
))
register(_task_vector_member(
    "dare_ties", "DARE random drop and rescale, then TIES sign consensus",
    "many similar fine-tunes: TIES with random dropping",
    sparsifier="random", consensus=True, normalize=False, rescale=True,
))
register(_task_vector_member(
    "breadcrumbs", "task vectors without the top gamma outliers and the small tail",
    "drop both the outlier and the tiny changes before adding",
    sparsifier="magnitude_outliers", consensus=False, normalize=False,
))
register(_task_vector_member(
    "breadcrumbs_ties", "breadcrumbs sparsification, then TIES sign consensus",
    "breadcrumbs, then resolve sign conflicts as TIES does",
    sparsifier="magnitude_outliers", consensus=True, normalize=False,
))
register(_task_vector_member(
    "della", "per-row magnitude-ranked random drop (DELLA), rescale, sign consensus",
    "DARE with magnitude-ranked keep probabilities per row, with sign consensus",
    sparsifier="della", consensus=True, normalize=True, rescale=True,
))
register(_task_vector_member(
    "della_linear", "per-row magnitude-ranked random drop (DELLA), rescale, weighted sum",
    "DARE with magnitude-ranked keep probabilities per row, weighted sum",
    sparsifier="della", consensus=False, normalize=False, rescale=True,
))
register(Method(
    name="passthrough",
    summary="one model's tensors unchanged (optionally scaled); with slices, stacks layers",
    when_to_use="copy tensors (optionally `scale`d); with `slices`, stack layer ranges "
                "(frankenmerge)",
    kernel="mergebuild.methods.passthrough:merge_passthrough",
    elementwise=True,
    passes_through=True,
    params=(Param("scale", "float", default=1.0, scope="parent",
                  help="multiply this model's tensors"),),
    min_parents=1,
    max_parents=1,
))


# --- more methods (methods-B) ---
# Names, defaults and base policies follow mergekit 0.1.5; where mergekit gives no range,
# only values that cannot mean anything (negative counts or tolerances) are refused.
# As in methods-A, sce's `int8_mask` (a memory knob with no effect on results) is not a
# parameter (accepted with a warning).

_WEIGHT = Param("weight", "float", scope="parent", help="relative weight of this model")

register(
    Method(
        name="nuslerp",
        when_to_use="slerp with per-model weights, or slerp of task vectors when a base is given",
        kernel="mergebuild.methods.nuslerp:nuslerp",
        summary="slerp two models (or their task vectors, with a base) at t = w2 / (w1 + w2)",
        base="optional",
        params=(
            _WEIGHT,
            Param(
                "nuslerp_flatten",
                "bool",
                default=True,
                help="interpolate the whole tensor as one vector",
            ),
            Param(
                "nuslerp_row_wise",
                "bool",
                default=False,
                help="without flatten: vectors along dim 0 instead of the last dim",
            ),
        ),
        min_parents=2,
        max_parents=2,
    )
)
register(
    Method(
        name="multislerp",
        when_to_use="spherical blend of more than two models",
        kernel="mergebuild.methods.multislerp:multislerp",
        summary="weighted barycentric slerp of any number of models (task vectors with a base)",
        base="optional",
        params=(
            _WEIGHT,
            Param(
                "normalize_weights",
                "bool",
                default=True,
                help="divide the weights by their sum",
            ),
            Param("eps", "float", default=1e-8, minimum=0.0, help="numerical guard"),
        ),
    )
)
register(
    Method(
        name="karcher",
        when_to_use="geometric (Riemannian) mean of several models, no weights to tune",
        kernel="mergebuild.methods.karcher:karcher",
        summary="iterative Riemannian mean of the normalised models, scaled by their mean norm",
        params=(
            Param("max_iter", "int", default=10, minimum=0, help="maximum iterations"),
            Param("tol", "float", default=1e-5, minimum=0.0, help="convergence tolerance"),
        ),
    )
)
register(
    Method(
        name="model_stock",
        when_to_use="several fine-tunes of one base; the ratio comes from their angle, "
                    "nothing to tune",
        kernel="mergebuild.methods.model_stock:model_stock",
        summary="move from the base towards the models' mean by their task vectors' cosine",
        base="required",
        params=(
            Param(
                "filter_wise",
                "bool",
                default=False,
                help="one cosine per row instead of per tensor",
            ),
        ),
        min_parents=2,
    )
)
register(
    Method(
        name="sce",
        when_to_use="several experts; keeps high-variance positions, weights by energy",
        kernel="mergebuild.methods.sce:sce",
        summary="select high-variance positions, energy-weight task vectors, erase sign conflicts",
        base="required",
        params=(
            Param(
                "select_topk",
                "float",
                default=1.0,
                help="fraction of positions kept by variance across models (1 keeps all)",
            ),
        ),
    )
)
register(
    Method(
        name="nearswap",
        when_to_use="pull a model towards the base where they are already close",
        kernel="mergebuild.methods.nearswap:nearswap",
        summary="take the model's values where they lie within t of the base's",
        base="required",
        params=(Param("t", "float", help="distance under which values are swapped"),),
        min_parents=1,
        max_parents=1,
    )
)
_RAM_EPSILON = Param(
    "epsilon",
    "float",
    default=1e-5,
    minimum=0.0,
    help="task-vector entries with |value| above this are active",
)
register(
    Method(
        name="ram",
        when_to_use="reinforcement-learned experts: sum unique changes, average shared ones",
        kernel="mergebuild.methods.ram:ram",
        summary="sum task-vector entries unique to one model, average shared ones",
        base="required",
        params=(_RAM_EPSILON,),
    )
)
register(
    Method(
        name="ramplus_tl",
        when_to_use="as ram, boosting each model's unique changes by its shared/unique ratio",
        kernel="mergebuild.methods.ram:ramplus_tl",
        summary="RAM with each model's unique entries scaled by its shared/unique ratio",
        base="required",
        params=(
            Param("r", "float", default=0.1, help="strength of the unique-entry boost"),
            Param("alpha", "float", default=0.2, minimum=0.0, help="cap on the ratio"),
            _RAM_EPSILON,
        ),
    )
)
register(
    Method(
        name="arcee_fusion",
        when_to_use="take only the parts of one model that differ importantly from the base",
        kernel="mergebuild.methods.arcee_fusion:arcee_fusion",
        summary="take the model's changes where their KL-weighted importance is an outlier",
        base="required",
        min_parents=1,
        max_parents=1,
    )
)


# --- the methods table (`mergebuild methods --markdown`, README's "Methods") ---


_BASE_CELL = {"none": "no", "required": "required", "optional": "optional"}


def _param_cell(p: Param) -> str:
    value = "required" if p.required else f"{p.default!r}".replace("'", "")
    if isinstance(p.default, bool):
        value = str(p.default).lower()
    scope = ", per model" if p.scope == "parent" else ""
    return f"`{p.name}` ({value}{scope})"


def methods_markdown() -> str:
    """The methods table as Markdown: method, base, parameters with defaults, when to use it.

    README's "Methods" table is this text (a test keeps them in step).
    """
    rows = ["| method | base | parameters (default) | when to use it |", "|---|---|---|---|"]
    for m in {m.name: m for m in METHODS.values()}.values():  # registry order: by family
        params = ", ".join(_param_cell(p) for p in m.params) or "—"
        random = " (randomised, seeded per tensor)" if m.randomized else ""
        rows.append(f"| `{m.name}` | {_BASE_CELL[m.base]} | {params} | "
                    f"{m.when_to_use}{random} |")
    return "\n".join(rows) + "\n"
