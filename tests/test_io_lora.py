"""LoRA adapters (PEFT format) applied on the fly to a parent during streaming."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergebuild.errors import IncompatibleModelsError
from mergebuild.io.lora import LoraAdapter, scaling

TARGETS = ("model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.v_proj")


def write_adapter(directory: Path, base: Path, seed: int, *, r: int = 4, alpha: float = 16,
                  rslora: bool = False, shapes: dict | None = None) -> dict[str, torch.Tensor]:
    """A PEFT adapter for the demo base; returns the expected float32 delta per tensor."""
    directory.mkdir(parents=True)
    weights = load_file(str(next(base.glob("*.safetensors"))))
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for module in TARGETS:
        out, inner = (shapes or {}).get(module, weights[module + ".weight"].shape)
        a = torch.randn(r, inner, generator=g) * 0.1
        b = torch.randn(out, r, generator=g) * 0.1
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        scale = alpha / (math.sqrt(r) if rslora else r)
        deltas[module + ".weight"] = (b @ a) * scale
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False,
    }))
    return deltas


def test_scaling_follows_peft():
    assert scaling({"lora_alpha": 16}, "m.q_proj", 4) == 4.0
    assert scaling({"lora_alpha": 16, "use_rslora": True}, "m.q_proj", 4) == 8.0
    cfg = {"lora_alpha": 16, "alpha_pattern": {"q_proj": 32}}
    assert scaling(cfg, "model.layers.0.self_attn.q_proj", 4) == 8.0
    assert scaling(cfg, "model.layers.0.self_attn.v_proj", 4) == 4.0


def _write(workspace, text: str) -> None:
    workspace.mergefile.write_text(textwrap.dedent(text))


def _built(project, node) -> dict[str, torch.Tensor]:
    project.make([node])
    return load_file(str(project.path(node) / "model.safetensors"))


def test_lora_applied_on_the_fly(workspace, demo_models, tmp_path):
    base = demo_models["base"]
    deltas = write_adapter(tmp_path / "lora1", base, 1, rslora=True)
    _write(workspace, f"""
    version: 1
    models:
      base: {{source: {base}}}
      adapted:
        merge_method: linear
        models: [{{model: base+{tmp_path / 'lora1'}, parameters: {{weight: 1.0}}}}]
        dtype: float32
    """)
    out = _built(workspace.project(), "adapted")
    ref = load_file(str(base / "model.safetensors"))
    for name, tensor in ref.items():
        expected = tensor.float() + deltas.get(name, 0)
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-6)
    # nothing but the output was written: no merged copy of base+lora in the store
    objects = list((workspace.cache / "objects").glob("*/*"))
    assert len(objects) == 1


def test_merging_several_adapters(workspace, demo_models, tmp_path):
    base = demo_models["base"]
    d1 = write_adapter(tmp_path / "l1", base, 1)
    d2 = write_adapter(tmp_path / "l2", base, 2, r=2, alpha=4)
    _write(workspace, f"""
    version: 1
    models:
      base: {{source: {base}}}
      both:
        merge_method: task_arithmetic
        base_model: base
        models:
          - {{model: base+{tmp_path / 'l1'}, parameters: {{weight: 0.5}}}}
          - {{model: base+{tmp_path / 'l2'}, parameters: {{weight: 0.5}}}}
        dtype: float32
    """)
    project = workspace.project()
    out = _built(project, "both")
    ref = load_file(str(base / "model.safetensors"))
    for name in d1:
        expected = ref[name].float() + 0.5 * d1[name] + 0.5 * d2[name]
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)
    # the adapter's digest is part of the identity: a changed adapter makes the node stale
    states = {s.name: s for s in project.plan(["both"])}
    assert states["both"].status == "fresh"
    write_adapter(tmp_path / "l3", base, 3)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (tmp_path / "l2" / f).write_bytes((tmp_path / "l3" / f).read_bytes())
    states = {s.name: s for s in workspace.project().plan(["both"])}
    assert states["both"].status == "stale"
    assert any("parent changed" in r for r in states["both"].reasons)


def test_lora_that_does_not_fit_is_one_line_error(demo_models, tmp_path):
    from mergebuild.io.lora import AdaptedReader

    base = demo_models["base"]
    write_adapter(tmp_path / "bad", base, 1,
                  shapes={"model.layers.0.self_attn.q_proj": (64, 32)})
    with pytest.raises(IncompatibleModelsError, match="does not fit model.layers.0.self_attn"):
        AdaptedReader(base, tmp_path / "bad", "n")
    adapter = LoraAdapter(tmp_path / "bad", "n")
    assert set(adapter.pairs) == {t + ".weight" for t in TARGETS}


def test_stacked_adapters_are_a_one_line_error(workspace, demo_models, tmp_path):
    from mergebuild.errors import MergefileError

    base = demo_models["base"]
    write_adapter(tmp_path / "l1", base, 1)
    write_adapter(tmp_path / "l2", base, 2)
    _write(workspace, f"""
    version: 1
    models:
      base: {{source: {base}}}
      twice:
        merge_method: linear
        models: [{{model: base+{tmp_path / 'l1'}+{tmp_path / 'l2'}, parameters: {{weight: 1}}}}]
    """)
    with pytest.raises(MergefileError) as caught:
        workspace.project()
    message = str(caught.value)
    assert f"'base+{tmp_path / 'l1'}+{tmp_path / 'l2'}' stacks two adapters" in message
    assert f"merge 'base+{tmp_path / 'l1'}' into a node of its own" in message
    assert caught.value.node == "twice" and caught.value.line == 7 and "\n" not in message
    assert not (workspace.cache / "objects").exists()


ADAPTER_COMMIT = "ad" * 20
BASE_COMMIT = "ba" * 20


def test_hub_adapter_on_a_hub_model_offline(workspace, demo_models, tmp_path, monkeypatch):
    """``org/base+org/adapter@rev``: both resolved from the Hugging Face cache, offline."""
    from test_sources_hub import offline_hub_cache

    cache = offline_hub_cache(tmp_path, monkeypatch)
    base = demo_models["base"]
    cache.add_commit("org/base", BASE_COMMIT, {p.name: p.read_bytes() for p in base.iterdir()
                                               if p.is_file() and not p.name.startswith(".")})
    cache.set_ref("org/base", "main", BASE_COMMIT)
    deltas = write_adapter(tmp_path / "lora", base, 5)
    cache.add_commit("org/adapter", ADAPTER_COMMIT,
                     {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()})
    cache.set_ref("org/adapter", "v1", ADAPTER_COMMIT)
    _write(workspace, """
    version: 1
    models:
      adapted:
        merge_method: linear
        models: [{model: org/base+org/adapter@v1, parameters: {weight: 1.0}}]
        dtype: float32
    """)
    project = workspace.project()
    states = {s.name: s for s in project.plan(["adapted"])}
    source = states["org/base+org/adapter@v1"].source
    assert source.extra["adapter"].commit == ADAPTER_COMMIT
    out = _built(project, "adapted")
    ref = load_file(str(base / "model.safetensors"))
    for name, tensor in ref.items():
        torch.testing.assert_close(out[name], tensor.float() + deltas.get(name, 0),
                                   rtol=0, atol=1e-6)
    card = (project.path("adapted") / "README.md").read_text()
    assert "base_model:\n- org/base\n" in card  # the model's repo, not 'org/base+hf:'
    # the adapter's commit is part of the identity: another revision makes the node stale
    write_adapter(tmp_path / "lora2", base, 6)
    cache.add_commit("org/adapter", "ae" * 20,
                     {p.name: p.read_bytes() for p in (tmp_path / "lora2").iterdir()})
    cache.set_ref("org/adapter", "v1", "ae" * 20)
    states = {s.name: s for s in workspace.project().plan(["adapted"])}
    assert states["adapted"].status == "stale"
    # --frozen keeps the adapter's locked commit: the moved tag changes nothing
    import json

    from mergebuild.api import Project

    lock = json.loads((workspace.mergefile.parent / "Mergefile.lock").read_text())
    assert lock["sources"]["org/base+org/adapter@v1#adapter"]["commit"] == ADAPTER_COMMIT
    frozen = Project(workspace.mergefile, workspace.cache, frozen=True)
    states = {s.name: s for s in frozen.plan(["adapted"])}
    assert states["adapted"].status == "fresh"
    assert states["org/base+org/adapter@v1"].source.extra["adapter"].commit == ADAPTER_COMMIT
