"""PEFT LoRA adapters applied on the fly: a reader whose tensors are parent + B·A·scaling."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergebuild.errors import IncompatibleModelsError, SourceError
from mergebuild.io.checkpoint import CheckpointReader
from mergebuild.io.json_limits import CONFIG_MAX_BYTES, read_json_bounded
from mergebuild.io.module_patterns import ModulePattern, PatternError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")


def check_adapter_directory(directory: Path, node: str) -> None:
    """One-line SourceError unless ``directory`` holds a PEFT adapter in safetensors."""
    if not directory.is_dir():
        raise SourceError(f"LoRA adapter directory {directory} does not exist", node=node,
                          hint="fix the path after '+' in the model reference")
    if not (directory / ADAPTER_CONFIG).is_file():
        raise SourceError(f"{directory} is not a PEFT adapter (no {ADAPTER_CONFIG})", node=node,
                          hint="point '+' at a directory saved by peft's save_pretrained")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        pickled = (directory / "adapter_model.bin").is_file()
        raise SourceError(
            f"{directory} has no {ADAPTER_WEIGHTS}" + (" (only pickle .bin)" if pickled else ""),
            node=node, hint="save the adapter with safe_serialization=True",
        )


def compile_patterns(config: dict[str, Any], field: str) -> list[tuple[ModulePattern, Any]]:
    """An adapter's ``rank_pattern`` or ``alpha_pattern``, in order, each key compiled to a
    linear-time matcher (see ``io/module_patterns.py``).

    Raises:
        PatternError: the field is not a mapping of pattern to number, or a key is not a
            regular expression PEFT could use, or needs backtracking (one line).
    """
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise PatternError(f"{field} is not a mapping of module pattern to value")
    compiled = []
    for key, value in patterns.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0):
            raise PatternError(f"{field} gives '{key}' the value {value!r}, not a positive "
                               "number")
        try:
            compiled.append((ModulePattern(key), value))
        except PatternError as exc:
            raise PatternError(f"{field}: {exc}") from None
    return compiled


def _pattern_value(patterns: list[tuple[ModulePattern, Any]], module: str, default: Any) -> Any:
    # PEFT's rule (get_pattern_key): the first key, in order, matching the module name or a
    # suffix of it that starts after a dot.
    for pattern, value in patterns:
        if pattern.matches(module):
            return value
    return default


@dataclass(frozen=True)
class LoraPair:
    """One adapted tensor: the delta is ``B @ A * scaling`` (transposed for embeddings)."""

    target: str  # the parent tensor the delta is added to
    a: str  # tensor names inside the adapter file
    b: str
    scaling: float
    transpose: bool


def scaling(config: dict[str, Any], module: str, rank: int,
            patterns: tuple[list, list] | None = None) -> float:
    """PEFT's scaling: lora_alpha / r, or / sqrt(r) with ``use_rslora``; per-module patterns
    (``patterns``: the config's compiled (alpha_pattern, rank_pattern), compiled here when
    not given)."""
    alphas, ranks = patterns or (compile_patterns(config, "alpha_pattern"),
                                 compile_patterns(config, "rank_pattern"))
    alpha = _pattern_value(alphas, module, config.get("lora_alpha", 8))
    rank = _pattern_value(ranks, module, rank)
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


class LoraAdapter:
    """An adapter's config and tensors; pairs indexed by the parent tensor they change."""

    def __init__(self, directory: Path, node: str):
        self.directory = Path(directory)
        check_adapter_directory(self.directory, node)
        try:
            self.config = read_json_bounded(self.directory / ADAPTER_CONFIG, CONFIG_MAX_BYTES)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SourceError(f"{ADAPTER_CONFIG} in {directory} is not valid JSON ({exc})",
                              node=node) from None
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise SourceError(f"adapter {directory} is {peft_type}, only LoRA is supported",
                              node=node)
        if self.config.get("use_dora"):
            raise SourceError(f"adapter {directory} uses DoRA, which is not supported",
                              node=node, hint="merge DoRA adapters with peft first")
        self.reader = CheckpointReader(self.directory)
        self.pairs: dict[str, LoraPair] = {}
        self.replaced: dict[str, str] = {}  # parent tensor → adapter tensor (modules_to_save)
        halves: dict[str, dict[str, str]] = {}
        for name in self.reader.tensors:
            key = name.removeprefix(_PREFIX)
            m = _LORA_KEY.match(key)
            if m is None:
                if "lora_magnitude_vector" in key:
                    raise SourceError(f"adapter {directory} uses DoRA, which is not supported",
                                      node=node)
                target = key.replace(".modules_to_save.default", "")
                self.replaced[target.replace(".modules_to_save", "")] = name
                continue
            halves.setdefault(m["module"], {})[m["kind"]] = name
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        try:
            patterns = (compile_patterns(self.config, "alpha_pattern"),
                        compile_patterns(self.config, "rank_pattern"))
        except PatternError as exc:
            raise SourceError(f"{ADAPTER_CONFIG} in {directory}: {exc}", node=node,
                              hint="PEFT's pattern keys are module paths such as "
                                   "'layers.0.self_attn.q_proj' or 'experts.*.w1'") from None
        for module, parts in sorted(halves.items()):
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a = parts.get("lora_embedding_A" if embedding else "lora_A")
            b = parts.get("lora_embedding_B" if embedding else "lora_B")
            if a is None or b is None:
                raise SourceError(f"adapter {directory} has only one half of the LoRA pair "
                                  f"for {module}", node=node)
            rank = self.reader.tensors[a].shape[0]
            self.pairs[f"{module}.weight"] = LoraPair(
                target=f"{module}.weight", a=a, b=b, scaling=scaling(self.config, module, rank, patterns),
                transpose=embedding or fan_in_fan_out,
            )

    def check_against(self, parent: CheckpointReader, node: str) -> None:
        """IncompatibleModelsError (one line) unless every adapted tensor fits the parent."""
        for target, pair in self.pairs.items():
            info = parent.tensors.get(target)
            if info is None:
                raise IncompatibleModelsError(
                    f"LoRA {self.directory.name} adapts {target}, which the model lacks",
                    node=node, hint="use the adapter with the base model it was trained on",
                )
            a, b = self.reader.tensors[pair.a].shape, self.reader.tensors[pair.b].shape
            out, inner = (b[0], a[1]) if not pair.transpose else (a[1], b[0])
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or tuple(info.shape) != (out, inner):
                raise IncompatibleModelsError(
                    f"LoRA {self.directory.name} does not fit {target}: A {list(a)} · B "
                    f"{list(b)} vs the model's {list(info.shape)}", node=node,
                    hint="use the adapter with the base model it was trained on",
                )
        for target, name in self.replaced.items():
            info = parent.tensors.get(target)
            if info is None or info.shape != self.reader.tensors[name].shape:
                raise IncompatibleModelsError(
                    f"LoRA {self.directory.name} replaces {target}, which "
                    + ("the model lacks" if info is None else
                       f"has shape {list(info.shape)} in the model, "
                       f"{list(self.reader.tensors[name].shape)} in the adapter"),
                    node=node, hint="use the adapter with the base model it was trained on",
                )

    def delta(self, target: str):
        """The float32 delta for one parent tensor, or None if the adapter leaves it alone."""
        import torch

        pair = self.pairs.get(target)
        if pair is None:
            return None
        a = self.reader.load(pair.a).to(torch.float32)
        b = self.reader.load(pair.b).to(torch.float32)
        delta = (b @ a) * pair.scaling
        return delta.T if pair.transpose else delta


class AdaptedReader(CheckpointReader):
    """A model directory read through a LoRA: ``load`` returns parent + delta in float32.

    Nothing is materialised: each adapted tensor is computed when the engine streams it.
    """

    def __init__(self, directory: Path, adapter_directory: Path, node: str):
        super().__init__(directory)
        self.adapter = LoraAdapter(adapter_directory, node)
        self.adapter.check_against(self, node)

    def weight_files(self) -> list[Path]:
        return [*super().weight_files(), *self.adapter.reader.weight_files()]

    def load(self, name: str, *, copy: bool = False):
        import torch

        replaced = self.adapter.replaced.get(name)
        if replaced is not None:
            return self.adapter.reader.load(replaced, copy=True)
        delta = self.adapter.delta(name)
        tensor = super().load(name, copy=copy)
        if delta is None:
            return tensor
        return tensor.to(torch.float32) + delta

    def close(self) -> None:
        self.adapter.reader.close()
        super().close()


__all__ = ["ADAPTER_FILES", "AdaptedReader", "LoraAdapter", "check_adapter_directory",
           "scaling"]
