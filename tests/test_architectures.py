"""Beyond Llama: Qwen2 biases, tied embeddings (no lm_head), Mistral and Gemma naming."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ARCHS = {
    "qwen2": {"bias": True, "tied": True},
    "mistral": {"bias": False, "tied": False},
    "gemma": {"bias": False, "tied": True},
}


def write_model(directory: Path, arch: str, seed: int, layers: int = 3, h: int = 16) -> None:
    spec = ARCHS[arch]
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(32, h, generator=g),
                                  "model.norm.weight": torch.randn(h, generator=g)}
    if not spec["tied"]:
        t["lm_head.weight"] = torch.randn(32, h, generator=g)
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            t[p + f"self_attn.{proj}_proj.weight"] = torch.randn(h, h, generator=g)
            if spec["bias"] and proj != "o":
                t[p + f"self_attn.{proj}_proj.bias"] = torch.randn(h, generator=g)
        t[p + "mlp.up_proj.weight"] = torch.randn(2 * h, h, generator=g)
        t[p + "input_layernorm.weight"] = torch.randn(h, generator=g)
    directory.mkdir(parents=True)
    save_file(t, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({
        "model_type": arch, "num_hidden_layers": layers, "hidden_size": h, "vocab_size": 32,
        "tie_word_embeddings": spec["tied"]}))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gradient_merge_and_slices(arch, tmp_path):
    from mergebuild.project import Project

    write_model(tmp_path / "a", arch, 1)
    write_model(tmp_path / "b", arch, 2)
    (tmp_path / "Mergefile").write_text(textwrap.dedent(f"""
        version: 1
        models:
          a: {{source: ./a}}
          b: {{source: ./b}}
          mix:
            merge_method: linear
            models:
              - {{model: a, parameters: {{weight: [1.0, 0.0]}}}}
              - {{model: b, parameters: {{weight: [0.0, 1.0]}}}}
            dtype: float32
          stack:
            merge_method: passthrough
            slices:
              - sources: [{{model: a, layer_range: [0, 2]}}]
              - sources: [{{model: b, layer_range: [1, 3]}}]
            dtype: float32
        """))
    project = Project(tmp_path / "Mergefile", tmp_path / "cache")
    project.make(["mix", "stack"])
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    mix = load_file(str(project.path("mix") / "model.safetensors"))
    assert set(mix) == set(a)
    assert ("lm_head.weight" in mix) is not ARCHS[arch]["tied"]
    # gradient over 3 layers: layer 0 is a, layer 2 is b, layer 1 the mean (biases included)
    name = "model.layers.{}.self_attn.q_proj." + ("bias" if ARCHS[arch]["bias"] else "weight")
    torch.testing.assert_close(mix[name.format(0)], a[name.format(0)])
    torch.testing.assert_close(mix[name.format(2)], b[name.format(2)])
    torch.testing.assert_close(mix[name.format(1)], (a[name.format(1)] + b[name.format(1)]) / 2)
    stack = load_file(str(project.path("stack") / "model.safetensors"))
    torch.testing.assert_close(stack[name.format(3)], b[name.format(2)])
    torch.testing.assert_close(stack[name.format(1)], a[name.format(1)])
    assert "model.layers.4.input_layernorm.weight" not in stack
    config = json.loads((project.path("stack") / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert config["tie_word_embeddings"] is ARCHS[arch]["tied"]
