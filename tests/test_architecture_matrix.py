"""Tiny Hugging Face models of 15 architectures: each merge builds, loads with from_pretrained
without missing or unexpected keys, and gives mergekit 0.1.5's tensors where mergekit's own
output loads (float32: within 2 ulps or |Δ| ≤ 1e-6; TIES by task-vector error ≤ 2e-3).

mergekit and transformers come with the test extra (``.ci/run``); nothing here skips.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from mergekit_oracle import mergekit_merge
from safetensors.torch import load_file

from mergebuild.api import Project
from mergebuild.errors import IncompatibleModelsError

_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=64)
_MOE = dict(num_experts_per_tok=2)

# name → (model_type, config arguments); four layers, hidden size 32, 64 tokens
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", _DECODER),
    "mistral": ("mistral", _DECODER),
    "qwen2": ("qwen2", _DECODER),
    "qwen3": ("qwen3", _DECODER),
    "gemma2": ("gemma2", _DECODER),
    "gemma3_text": ("gemma3_text", _DECODER),
    "phi3": ("phi3", dict(_DECODER, num_key_value_heads=4, pad_token_id=0)),
    "olmo2": ("olmo2", _DECODER),
    "starcoder2": ("starcoder2", _DECODER),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=4, n_head=4, vocab_size=64, n_positions=64)),
    "gpt_neox": ("gpt_neox", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, vocab_size=64,
                                  max_position_embeddings=64)),
    "mixtral": ("mixtral", dict(_DECODER, num_local_experts=4, **_MOE)),
    "qwen3_moe": ("qwen3_moe", dict(_DECODER, num_experts=4, moe_intermediate_size=32,
                                    decoder_sparse_step=1, mlp_only_layers=[], **_MOE)),
    "mamba": ("mamba", dict(hidden_size=32, num_hidden_layers=4, vocab_size=64, state_size=4,
                            expand=2, conv_kernel=4)),
    "llava": ("llava", dict(
        text_config=dict(_DECODER, model_type="llama"),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=16,
                           patch_size=8),
        image_token_id=3)),
}
VISION_LANGUAGE = {"llava"}
MIXTURES = {"mixtral", "qwen3_moe"}

# Each case as a mergekit config over the nodes base, ft1, ft2 (paths for mergekit).
CASES: dict[str, dict[str, Any]] = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "ft1", "parameters": {"weight": 0.6}},
        {"model": "ft2", "parameters": {"weight": 0.4}}]},
    "ties": {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "ft1", "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": "ft2", "parameters": {"weight": 0.5, "density": 0.7}}]},
    "slerp": {"merge_method": "slerp", "base_model": "base",
              "models": [{"model": "base"}, {"model": "ft1"}], "parameters": {"t": 0.3}},
    "karcher": {"merge_method": "karcher",
                "models": [{"model": "ft1"}, {"model": "ft2"}, {"model": "base"}]},
    # LazyMergekit's SLERP template: one slice over the whole depth, t by filter and layer
    "sliced_slerp": {"merge_method": "slerp", "base_model": "base", "slices": [
        {"sources": [{"model": "base", "layer_range": [0, 4]},
                     {"model": "ft1", "layer_range": [0, 4]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                             {"value": 0.5}]}},
    # five layers: base's 0–1, then ft1's 1–3
    "stack": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "base", "layer_range": [0, 2]}]},
        {"sources": [{"model": "ft1", "layer_range": [1, 4]}]}]},
}

# Where mergekit 0.1.5 (with transformers 5) writes no loadable model, and why; asserted, so
# a mergekit that starts to work here is noticed.
MERGEKIT_FAILS: dict[tuple[str, str], str] = {
    **{("gpt_neox", case): "requires the attention.bias buffers transformers 5 does not save"
       for case in CASES},
    **{(arch, "stack"): "keeps layer_types at the source depth"
       for arch in ("qwen2", "qwen3", "gemma2", "gemma3_text")},
    **{("llava", case): "writes the model without its language-model layers"
       for case in ("linear", "ties", "slerp", "karcher")},
    **{("llava", case): "needs the modules: syntax for slices of a multi-module model"
       for case in ("stack", "sliced_slerp")},
}


@dataclass
class Built:
    arch: str
    models: Path
    ours: dict[str, Path | Exception]
    theirs: dict[str, Path | Exception]


def _quiet() -> None:
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("mergekit").setLevel(logging.ERROR)


def _auto_class(arch: str):
    import transformers

    if arch in VISION_LANGUAGE:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def _write_models(arch: str, root: Path) -> None:
    """base from the config, ft1 and ft2 = base + deterministic noise (1% of each tensor's
    mean magnitude: far above float32 rounding, so every method's comparison is meaningful)."""
    from transformers import AutoConfig

    model_type, kwargs = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = _auto_class(arch).from_config(AutoConfig.for_model(model_type, **kwargs))
    model.save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for seed, name in ((1, "ft1"), (2, "ft2")):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                if param.is_floating_point():
                    noise = torch.randn(param.shape, generator=g)
                    param.copy_(base[key] + 0.01 * noise * (base[key].abs().mean() + 1e-3))
        model.save_pretrained(root / name)


def _with_paths(config: Any, models: Path) -> Any:
    if isinstance(config, dict):
        return {k: (str(models / v) if k in ("model", "base_model") else _with_paths(v, models))
                for k, v in config.items()}
    if isinstance(config, list):
        return [_with_paths(v, models) for v in config]
    return config


def _run_mergekit(config: dict[str, Any], out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(dict(config, dtype="float32")), str(out),
              MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False,
                           random_seed=0, quiet=True))
    return out


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def built(request, tmp_path_factory) -> Built:
    _quiet()
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    models = root / "models"
    _write_models(arch, models)
    nodes = {name: {"source": f"./models/{name}"} for name in ("base", "ft1", "ft2")}
    nodes.update({case: dict(config, dtype="float32") for case, config in CASES.items()})
    (root / "Mergefile").write_text(json.dumps({"version": 1, "models": nodes}))
    project = Project(root / "Mergefile", root / "cache")
    ours: dict[str, Path | Exception] = {}
    theirs: dict[str, Path | Exception] = {}
    for case, config in CASES.items():
        try:
            project.make([case])
            ours[case] = project.path(case)
        except IncompatibleModelsError as exc:
            ours[case] = exc
        try:
            theirs[case] = _run_mergekit(_with_paths(config, models), root / "mergekit" / case)
        except Exception as exc:  # noqa: BLE001 - mergekit's failures are recorded, not hidden
            theirs[case] = exc
    return Built(arch, models, ours, theirs)


def _load_problems(arch: str, directory: Path) -> dict[str, list[str]]:
    """Missing, unexpected and mismatched keys of a from_pretrained load (empty: loads)."""
    _, info = _auto_class(arch).from_pretrained(str(directory), output_loading_info=True)
    return {k: sorted(v) for k, v in info.items()
            if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_float32_close(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    diff = (ours - theirs).abs()
    two_ulps = 2 * torch.finfo(torch.float32).eps * torch.maximum(ours.abs(), theirs.abs())
    bad = (diff > two_ulps) & (diff > 1e-6)
    assert not bool(bad.any()), f"{name}: max |Δ| {float(diff.max()):.3g}"


def _assert_task_vector_close(ours, theirs, base, name: str) -> None:
    error = float((ours - theirs).norm() / ((theirs - base).norm() + 1e-12))
    assert error <= 2e-3, f"{name}: task-vector error {error:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_builds_and_loads(built, case):
    result = built.ours[case]
    if built.arch in VISION_LANGUAGE and case in ("stack", "sliced_slerp"):
        assert isinstance(result, IncompatibleModelsError)
        assert "2 layer stacks" in str(result)
        return
    assert isinstance(result, Path), result
    assert _load_problems(built.arch, result) == {}
    config = json.loads((result / "config.json").read_text())
    depth = config.get("num_hidden_layers", config.get("n_layer"))
    if built.arch not in VISION_LANGUAGE:
        assert depth == (5 if case == "stack" else 4)
    for key, value in config.items():  # per-layer lists follow the stack
        if key.endswith("layer_types"):
            assert len(value) == depth, key


def test_a_stack_takes_the_layers_and_the_ends_from_their_slices(built):
    if built.arch in VISION_LANGUAGE:
        return  # refused (test_builds_and_loads)
    from mergebuild.build.parameters import layer_index, replace_layer_index

    stack = _tensors(built.ours["stack"])
    base, ft1 = _tensors(built.models / "base"), _tensors(built.models / "ft1")
    for name, tensor in stack.items():
        layer = layer_index(name)
        if layer is None:
            # embeddings from the first slice's model, final norm and head from the last's
            post = "norm" in name or "ln_f" in name or name in ("lm_head.weight",
                                                               "embed_out.weight")
            expected = (ft1 if post else base)[name]
        elif layer < 2:
            expected = base[name]
        else:
            expected = ft1[replace_layer_index(name, layer - 1)]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_mergekit(built, case):
    theirs = built.theirs[case]
    why = MERGEKIT_FAILS.get((built.arch, case))
    if why is not None:  # mergekit fails or writes a model that does not load
        assert isinstance(theirs, Exception) or _load_problems(built.arch, theirs) != {}, why
        return
    assert isinstance(theirs, Path), theirs
    assert _load_problems(built.arch, theirs) == {}
    ours_dir = built.ours[case]
    assert isinstance(ours_dir, Path)
    ours, reference = _tensors(ours_dir), _tensors(theirs)
    base = _tensors(built.models / "base")
    if built.arch in MIXTURES:
        ours = _fused_experts(built.arch, ours, set(reference))
        base = _fused_experts(built.arch, base, set(reference))
        if case in ("ties", "slerp", "sliced_slerp", "karcher"):  # mergekit merges fused experts
            ours = {n: t for n, t in ours.items() if ".experts." not in n}
            reference = {n: t for n, t in reference.items() if ".experts." not in n}
        if built.arch == "mixtral" and case == "sliced_slerp":
            # A filter matches the names as stored: ours are block_sparse_moe.*, which
            # mergekit (reading through transformers 5) sees renamed to mlp.*, so the "mlp"
            # filter's t applies to its router and not to ours — a naming convention (README).
            ours = {n: t for n, t in ours.items() if ".mlp." not in n}
            reference = {n: t for n, t in reference.items() if ".mlp." not in n}
    assert set(ours) == set(reference)
    for name in sorted(reference):
        assert ours[name].shape == reference[name].shape, name
        if case == "ties":
            _assert_task_vector_close(ours[name], reference[name], base[name], name)
        else:
            _assert_float32_close(ours[name], reference[name], name)


# --- mixtures of experts: stored per expert, merged per expert -------------------------------

_EXPERT_PARTS = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
                 "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def _fused_experts(arch: str, tensors: dict[str, torch.Tensor],
                   fused_names: set[str]) -> dict[str, torch.Tensor]:
    """Per-expert tensors in transformers 5's fused layout, as mergekit writes them:
    ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``mlp.experts.down_proj`` [E, H, I]."""
    block, gate, up, down = _EXPERT_PARTS[arch]
    out = {n: t for n, t in tensors.items() if ".experts." not in n}
    layers = sorted({int(n.split(".")[2]) for n in tensors if ".experts." in n})
    for i in layers:
        prefix = f"model.layers.{i}.{block}"
        experts = sorted({int(n.split(".experts.")[1].split(".")[0])
                          for n in tensors if n.startswith(prefix + ".experts.")})

        def part(name: str, e: int, prefix: str = prefix) -> torch.Tensor:
            return tensors[f"{prefix}.experts.{e}.{name}.weight"]

        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([part(gate, e), part(up, e)]) for e in experts])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
            [part(down, e) for e in experts])
        if block != "mlp":  # mixtral's router, renamed by transformers 5
            out[f"model.layers.{i}.mlp.gate.weight"] = out.pop(f"{prefix}.gate.weight")
    assert set(out) <= fused_names | set(tensors)
    return out


@pytest.mark.parametrize("case", ["ties", "slerp"])
def test_experts_are_merged_one_by_one(built, case):
    """Each expert's tensor is the dense method (mergekit's per-tensor function) applied to
    that expert alone; mergekit 0.1.5 on transformers 5 fuses the experts first, so its TIES
    threshold and SLERP angle span all experts of a layer (README, mergekit compatibility)."""
    if built.arch not in MIXTURES:
        return
    ours = _tensors(built.ours[case])  # type: ignore[arg-type]
    base, ft1, ft2 = (_tensors(built.models / n) for n in ("base", "ft1", "ft2"))
    experts = [n for n in ours if ".experts." in n]
    assert len(experts) == 4 * 4 * 3  # layers × experts × projections
    for name in experts:
        if case == "slerp":
            from mergekit.merge_methods.slerp import slerp

            expected = slerp(torch.tensor([0.3]), base[name][None], ft1[name][None])[0]
            _assert_float32_close(ours[name], expected, name)
        else:
            expected = mergekit_merge(
                "ties", [ft1[name], ft2[name]], base[name],
                per_parent={"weight": [0.5, 0.5], "density": [0.5, 0.7]},
                **{"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False})
            deltas = [ft1[name] - base[name], ft2[name] - base[name]]
            _assert_equal_but_tie_order(ours[name], expected, deltas, name)


def _assert_equal_but_tie_order(ours: torch.Tensor, expected: torch.Tensor,
                                deltas: list[torch.Tensor], name: str) -> None:
    """Equal, except where a parent's |δ| is a magnitude that occurs more than once: the top-k
    threshold may fall inside such a tie, and which tied element is kept is free (one element
    is ~1% of a 2,048-element expert's task vector, so an error bound would not do)."""
    tied = torch.zeros_like(ours, dtype=torch.bool)
    for delta in deltas:
        magnitude = delta.abs().flatten()
        _, inverse, counts = magnitude.unique(return_inverse=True, return_counts=True)
        tied |= (counts[inverse] > 1).reshape(ours.shape)
    differs = (ours - expected).abs() > 1e-6
    assert not bool((differs & ~tied).any()), f"{name}: {int(differs.sum())} elements differ"


def test_the_matrix_covers_the_architectures_the_issue_names():
    named = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2",
             "gpt_neox", "olmo2", "starcoder2", "mixtral", "qwen3_moe", "mamba"}
    assert named <= set(ARCHITECTURES) and VISION_LANGUAGE <= set(ARCHITECTURES)
