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


def write_model(directory: Path, arch: str, seed: int, layers: int = 3, h: int = 16,
                tied: bool | None = None, extras: dict[str, torch.Tensor] | None = None) -> None:
    spec = dict(ARCHS[arch], **({} if tied is None else {"tied": tied}))
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(32, h, generator=g),
                                  "model.norm.weight": torch.randn(h, generator=g)}
    if not spec["tied"]:
        t["lm_head.weight"] = torch.randn(32, h, generator=g)
    t.update(extras or {})
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
    from mergebuild.api import Project

    write_model(tmp_path / "a", arch, 1)
    write_model(tmp_path / "b", arch, 2)
    (tmp_path / "Mergefile").write_text(textwrap.dedent("""
        version: 1
        models:
          a: {source: ./a}
          b: {source: ./b}
          mix:
            merge_method: linear
            models:
              - {model: a, parameters: {weight: [1.0, 0.0]}}
              - {model: b, parameters: {weight: [0.0, 1.0]}}
            dtype: float32
          stack:
            merge_method: passthrough
            slices:
              - sources: [{model: a, layer_range: [0, 2]}]
              - sources: [{model: b, layer_range: [1, 3]}]
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


def _make(tmp_path: Path, body: str, target: str = "mix"):
    from mergebuild.api import Project

    (tmp_path / "Mergefile").write_text("version: 1\nmodels:\n" + textwrap.indent(
        textwrap.dedent(body), "  "))
    project = Project(tmp_path / "Mergefile", tmp_path / "cache")
    project.make([target])
    out = project.path(target)
    return load_file(str(out / "model.safetensors")), json.loads((out / "config.json").read_text())


def _load(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_tied_parent_supplies_its_embedding_for_an_untied_donors_head(tmp_path):
    write_model(tmp_path / "tied", "qwen2", 1, tied=True)
    write_model(tmp_path / "untied", "qwen2", 2, tied=False)
    mix, config = _make(tmp_path, """
        tied: {source: ./tied}
        untied: {source: ./untied}
        mix:
          merge_method: linear
          models: [{model: untied, parameters: {weight: 1}}, {model: tied, parameters: {weight: 1}}]
          dtype: float32
        """)
    a, b = _load(tmp_path / "tied"), _load(tmp_path / "untied")
    torch.testing.assert_close(mix["lm_head.weight"],
                               (a["model.embed_tokens.weight"] + b["lm_head.weight"]) / 2)
    embed = "model.embed_tokens.weight"
    torch.testing.assert_close(mix[embed], (a[embed] + b[embed]) / 2)
    assert config["tie_word_embeddings"] is False  # the donor's (first model's) config


def test_tied_donor_with_an_untied_parent_merges_the_head_and_unties(tmp_path):
    # mergekit merges lm_head (the tied parent's embedding as its head); keeping the donor's
    # tie would drop the untied parent's head (it moved lm_head by up to 0.13 on a tiny llama).
    write_model(tmp_path / "tied", "qwen2", 1, tied=True)
    write_model(tmp_path / "untied", "qwen2", 2, tied=False)
    mix, config = _make(tmp_path, """
        tied: {source: ./tied}
        untied: {source: ./untied}
        mix:
          merge_method: task_arithmetic
          base_model: tied
          models: [{model: untied, parameters: {weight: 0.5}}]
          dtype: float32
        """)
    a, b = _load(tmp_path / "tied"), _load(tmp_path / "untied")
    assert set(mix) == set(a) | {"lm_head.weight"}
    embed = "model.embed_tokens.weight"
    torch.testing.assert_close(mix[embed], a[embed] + 0.5 * (b[embed] - a[embed]))
    torch.testing.assert_close(mix["lm_head.weight"],
                               a[embed] + 0.5 * (b["lm_head.weight"] - a[embed]))
    assert config["tie_word_embeddings"] is False


def test_tied_parents_only_stay_tied(tmp_path):
    write_model(tmp_path / "a", "qwen2", 1, tied=True)
    write_model(tmp_path / "b", "qwen2", 2, tied=True)
    mix, config = _make(tmp_path, """
        a: {source: ./a}
        b: {source: ./b}
        mix: {merge_method: linear, models: [{model: a, parameters: {weight: 1}},
                                             {model: b, parameters: {weight: 1}}], dtype: float32}
        """)
    assert "lm_head.weight" not in mix and set(mix) == set(_load(tmp_path / "a"))
    assert config["tie_word_embeddings"] is True


def test_slices_take_the_untied_last_models_head_over_a_tied_first(tmp_path):
    write_model(tmp_path / "tied", "qwen2", 1, tied=True)
    write_model(tmp_path / "untied", "qwen2", 2, tied=False)
    stack, config = _make(tmp_path, """
        tied: {source: ./tied}
        untied: {source: ./untied}
        stack:
          merge_method: passthrough
          slices:
            - sources: [{model: tied, layer_range: [0, 2]}]
            - sources: [{model: untied, layer_range: [2, 3]}]
          dtype: float32
        """, target="stack")
    a, b = _load(tmp_path / "tied"), _load(tmp_path / "untied")
    torch.testing.assert_close(stack["lm_head.weight"], b["lm_head.weight"])
    torch.testing.assert_close(stack["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert config["tie_word_embeddings"] is False


def test_slices_take_the_head_from_a_tied_last_model(tmp_path):
    write_model(tmp_path / "untied", "qwen2", 1, tied=False)
    write_model(tmp_path / "tied", "qwen2", 2, tied=True)
    stack, config = _make(tmp_path, """
        untied: {source: ./untied}
        tied: {source: ./tied}
        stack:
          merge_method: passthrough
          slices:
            - sources: [{model: untied, layer_range: [0, 2]}]
            - sources: [{model: tied, layer_range: [2, 3]}]
          dtype: float32
        """, target="stack")
    a, b = _load(tmp_path / "untied"), _load(tmp_path / "tied")
    torch.testing.assert_close(stack["lm_head.weight"], b["model.embed_tokens.weight"])
    torch.testing.assert_close(stack["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    torch.testing.assert_close(stack["model.norm.weight"], b["model.norm.weight"])
    assert config["num_hidden_layers"] == 3 and config["tie_word_embeddings"] is False


def test_optional_buffers_the_donor_lacks_are_ignored(tmp_path):
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.arange(8.0)}
    write_model(tmp_path / "a", "mistral", 1)
    write_model(tmp_path / "b", "mistral", 2, extras=inv_freq)
    mix, _ = _make(tmp_path, """
        a: {source: ./a}
        b: {source: ./b}
        mix: {merge_method: linear, models: [{model: a, parameters: {weight: 1}},
                                             {model: b, parameters: {weight: 1}}], dtype: float32}
        """)
    assert set(mix) == set(_load(tmp_path / "a"))


def test_a_tensor_the_donor_has_and_a_parent_lacks_is_named(tmp_path):
    from mergebuild.errors import IncompatibleModelsError

    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.arange(8.0)}
    write_model(tmp_path / "a", "mistral", 1, extras=inv_freq)
    write_model(tmp_path / "b", "mistral", 2)
    with pytest.raises(IncompatibleModelsError,
                       match="node 'mix': .*'b' lacks tensor model.layers.0.self_attn.rotary_emb"):
        _make(tmp_path, """
            a: {source: ./a}
            b: {source: ./b}
            mix: {merge_method: linear, models: [{model: a, parameters: {weight: 1}},
                                                 {model: b, parameters: {weight: 1}}]}
            """)
