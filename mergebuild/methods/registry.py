"""The single list of merge methods and their parameter schemas (importable without torch).

Each entry names the function that computes it as ``"module:function"``; the module is
imported only when a tensor is actually merged, so validating and planning a Mergefile
never imports torch.

A method function has the signature::

    def merge(parents: list[Tensor], base: Tensor | None, params: TensorParams,
              generator: torch.Generator | None) -> Tensor

``parents`` are float32 tensors of the participating models, aligned with
``params.parents``; ``base`` is the float32 base tensor (None when the method takes no
base or none was given); ``generator`` is a CPU generator seeded by (node key, tensor
name) for randomised methods, None otherwise. The function returns a float32 tensor of
the same shape; it may modify its inputs in place (the engine never reuses them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


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
class Method:
    """A registered merge method.

    ``base``: "none" (a base_model only donates config/tokenizer; every listed model
    participates), "required" (participants are the listed models other than the base),
    or "optional" (as "required" when a base is given, else as "none").
    """

    name: str
    function: str  # "module:function"
    summary: str
    base: str = "none"
    params: tuple[Param, ...] = ()
    min_parents: int = 1
    max_parents: int | None = None
    randomized: bool = False
    aliases: tuple[str, ...] = field(default=())

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def load(self) -> Callable[..., Any]:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class TensorParams:
    """Parameters resolved to plain scalars for one output tensor."""

    tensor_name: str
    globals: Mapping[str, Any]
    parents: tuple[Mapping[str, Any], ...]


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
# is a memory knob with no effect on results and is not accepted.


def _core_weight() -> Param:
    return Param("weight", "float", scope="parent", help="relative weight of this model")


def _core_density() -> Param:
    return Param("density", "float", default=1.0, scope="parent", minimum=0.0, maximum=1.0,
                 help="fraction of the task vector to keep")


def _core_family(
    name: str, summary: str, *, normalize: bool, rescale: bool | None = None,
    consensus: bool = False, gamma: bool = False, epsilon: bool = False,
    randomized: bool = False,
) -> Method:
    # rescale is None for plain task arithmetic: it does not sparsify, so `density` and
    # `rescale` (accepted and ignored by mergekit) would do nothing and are refused.
    params = [_core_weight()] + ([_core_density()] if rescale is not None else []) + [
        Param("normalize", "bool", default=normalize,
              help="divide by the sum of the weights (of the agreeing models with consensus)"),
        Param("lambda", "float", default=1.0, help="scale of the merged task vector"),
    ]
    if rescale is not None:
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
    if gamma:
        params.append(Param("gamma", "float", default=0.01, scope="parent", minimum=0.0,
                            maximum=1.0, help="fraction of largest-magnitude outliers to drop"))
    if epsilon:
        params.append(Param("epsilon", "float", default=0.15, scope="parent", minimum=0.0,
                            maximum=0.5, max_exclusive=True,
                            help="spread of keep probabilities around density "
                                 "(density ± epsilon must lie in (0, 1))"))
    function = "merge_" + name
    return Method(
        name=name,
        function=f"mergebuild.methods.task_arithmetic.whole:{function}",
        summary=summary,
        base="required",
        params=tuple(params),
        randomized=randomized,
    )


register(Method(
    name="linear",
    function="mergebuild.methods.linear:merge_linear",
    summary="weighted average of the models",
    params=(
        _core_weight(),
        Param("normalize", "bool", default=True, help="divide by the sum of the weights"),
    ),
))
register(Method(
    name="slerp",
    function="mergebuild.methods.slerp:merge_slerp",
    summary="spherical interpolation from the base_model (t = 0) to one other model (t = 1)",
    base="required",
    params=(Param("t", "float", help="interpolation factor; 0 is the base_model"),),
    min_parents=1,
    max_parents=1,
))
register(_core_family("task_arithmetic", "base + λ·Σ w_i·(x_i − base)", normalize=False))
register(_core_family(
    "ties", "task vectors trimmed to their top density by magnitude, sign consensus",
    normalize=True, rescale=False, consensus=True,
))
register(_core_family(
    "dare_linear", "task vectors randomly dropped (keep p = density) and rescaled",
    normalize=False, rescale=True, randomized=True,
))
register(_core_family(
    "dare_ties", "DARE random drop and rescale, then TIES sign consensus",
    normalize=False, rescale=True, consensus=True, randomized=True,
))
register(_core_family(
    "breadcrumbs", "task vectors without the top gamma outliers and the small tail",
    normalize=False, rescale=False, gamma=True,
))
register(_core_family(
    "breadcrumbs_ties", "breadcrumbs sparsification, then TIES sign consensus",
    normalize=False, rescale=False, consensus=True, gamma=True,
))
register(_core_family(
    "della", "per-row magnitude-ranked random drop (DELLA), rescale, sign consensus",
    normalize=True, rescale=True, consensus=True, epsilon=True, randomized=True,
))
register(_core_family(
    "della_linear", "per-row magnitude-ranked random drop (DELLA), rescale, weighted sum",
    normalize=False, rescale=True, epsilon=True, randomized=True,
))
register(Method(
    name="passthrough",
    function="mergebuild.methods.passthrough:merge_passthrough",
    summary="one model's tensors unchanged (optionally scaled); with slices, stacks layers",
    params=(Param("scale", "float", default=1.0, scope="parent",
                  help="multiply this model's tensors"),),
    min_parents=1,
    max_parents=1,
))


# --- more methods (methods-B) ---
# Names, defaults and base policies follow mergekit 0.1.5; where mergekit gives no range,
# only values that cannot mean anything (negative counts or tolerances) are refused.
# As in methods-A, sce's `int8_mask` (a memory knob with no effect on results) is not accepted.

_WEIGHT = Param("weight", "float", scope="parent", help="relative weight of this model")

register(
    Method(
        name="nuslerp",
        function="mergebuild.methods.nuslerp:nuslerp",
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
        function="mergebuild.methods.multislerp:multislerp",
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
        function="mergebuild.methods.karcher:karcher",
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
        function="mergebuild.methods.model_stock:model_stock",
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
        function="mergebuild.methods.sce:sce",
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
        function="mergebuild.methods.nearswap:nearswap",
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
        function="mergebuild.methods.ram:ram",
        summary="sum task-vector entries unique to one model, average shared ones",
        base="required",
        params=(_RAM_EPSILON,),
    )
)
register(
    Method(
        name="ramplus_tl",
        function="mergebuild.methods.ram:ramplus_tl",
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
        function="mergebuild.methods.arcee_fusion:arcee_fusion",
        summary="take the model's changes where their KL-weighted importance is an outlier",
        base="required",
        min_parents=1,
        max_parents=1,
    )
)


# --- the methods table (`mergebuild methods --markdown`, README's "Methods") ---

WHEN_TO_USE: dict[str, str] = {
    "linear": "model soups: average fine-tunes of one base (weights normalised by default)",
    "slerp": "blend exactly two models smoothly; `t` may follow a per-layer gradient",
    "nuslerp": "slerp with per-model weights, or slerp of task vectors when a base is given",
    "multislerp": "spherical blend of more than two models",
    "karcher": "geometric (Riemannian) mean of several models, no weights to tune",
    "task_arithmetic": "add task vectors (model − base) with weights; `lambda` scales the sum",
    "ties": "combine several experts: keep each one's largest changes, resolve sign conflicts",
    "dare_linear": "many similar fine-tunes: task arithmetic with random dropping",
    "dare_ties": "many similar fine-tunes: TIES with random dropping",
    "breadcrumbs": "drop both the outlier and the tiny changes before adding",
    "breadcrumbs_ties": "breadcrumbs, then resolve sign conflicts as TIES does",
    "della": "DARE with magnitude-ranked keep probabilities per row, with sign consensus",
    "della_linear": "DARE with magnitude-ranked keep probabilities per row, weighted sum",
    "model_stock": "several fine-tunes of one base; the ratio comes from their angle, "
                   "nothing to tune",
    "sce": "several experts; keeps high-variance positions, weights by energy",
    "nearswap": "pull a model towards the base where they are already close",
    "ram": "reinforcement-learned experts: sum unique changes, average shared ones",
    "ramplus_tl": "as ram, boosting each model's unique changes by its shared/unique ratio",
    "arcee_fusion": "take only the parts of one model that differ importantly from the base",
    "passthrough": "copy tensors (optionally `scale`d); with `slices`, stack layer ranges "
                   "(frankenmerge)",
}

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
                    f"{WHEN_TO_USE[m.name]}{random} |")
    return "\n".join(rows) + "\n"
