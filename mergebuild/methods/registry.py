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
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


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


def get_method(name: str) -> Method | None:
    return METHODS.get(name)
