"""Tests for mergebuild.build.compat: merge compatibility from configs and tensor tables alone."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from mergebuild.build.compat import (
    ModelMetadata,
    check_compatibility,
    ignored_extras,
    layer_count,
    output_layout,
    tensor_sources,
    vocab_size,
)
from mergebuild.errors import IncompatibleModelsError, MergefileError


def _meta(layers: int = 2, vocab: int = 32, hidden: int = 8, model_type: str = "llama",
          config: bool = True) -> ModelMetadata:
    tensors = {"model.embed_tokens.weight": ("BF16", (vocab, hidden)),
               "lm_head.weight": ("BF16", (vocab, hidden))}
    for i in range(layers):
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = ("BF16", (2 * hidden, hidden))
    cfg = {"model_type": model_type, "num_hidden_layers": layers, "vocab_size": vocab}
    return ModelMetadata(config=cfg if config else {}, tensors=tensors)


@dataclass(frozen=True)
class Method:
    name: str = "task_arithmetic"
    base: str = "required"


TASK_ARITHMETIC = Method()


@dataclass(frozen=True)
class Job:
    base: str | None = "base"
    participants: tuple = (SimpleNamespace(node="tuned"),)
    node: str = "merged"
    method: Method = TASK_ARITHMETIC
    donor: str = "base"
    slices: tuple | None = None
    tokenizer_source: str | None = None


def test_compatible_parents_pass():
    check_compatibility(Job(), {"base": _meta(), "tuned": _meta()})


@pytest.mark.parametrize(
    ("tuned", "message"),
    [
        (_meta(model_type="mistral"), "architecture mismatch: 'base' is llama, 'tuned' is mistral"),
        (_meta(layers=4), "layer count mismatch: 'base' has 2 layers, 'tuned' has 4"),
        (_meta(vocab=48), "vocabulary mismatch: 'base' has 32 tokens, 'tuned' has 48"),
        (_meta(vocab=48, config=False), "vocabulary mismatch: 'base' has 32 tokens, 'tuned' has 48"),
        (_meta(hidden=16), "shape mismatch at model.embed_tokens.weight: 'base' [32, 8] vs 'tuned' [32, 16]"),
    ],
)
def test_mismatches_are_one_line_naming_node_and_both_parents(tuned, message):
    with pytest.raises(IncompatibleModelsError) as caught:
        check_compatibility(Job(), {"base": _meta(), "tuned": tuned})
    assert str(caught.value).startswith(f"node 'merged': {message}")
    assert "\n" not in str(caught.value)


def _without(meta: ModelMetadata, name: str, **config) -> ModelMetadata:
    return ModelMetadata({**meta.config, **config},
                         {n: v for n, v in meta.tensors.items() if n != name})


def _with(meta: ModelMetadata, name: str) -> ModelMetadata:
    return ModelMetadata(meta.config, {**meta.tensors, name: ("F32", (4,))})


def test_missing_tensor_is_named():
    tuned = _without(_meta(), "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(IncompatibleModelsError,
                       match="'tuned' lacks tensor model.layers.1.mlp.up_proj.weight"):
        check_compatibility(Job(), {"base": _meta(), "tuned": tuned})


@pytest.mark.parametrize("tie", [True, None])
def test_tied_parent_supplies_the_donors_head(tie):
    config = {} if tie is None else {"tie_word_embeddings": tie}
    tuned = _without(_meta(), "lm_head.weight", **config)
    check_compatibility(Job(), {"base": _meta(), "tuned": tuned})
    assert tensor_sources(_meta(), tuned)["lm_head.weight"] == "model.embed_tokens.weight"


def test_untied_config_without_head_is_a_missing_tensor():
    tuned = _without(_meta(), "lm_head.weight", tie_word_embeddings=False)
    with pytest.raises(IncompatibleModelsError, match="'tuned' lacks tensor lm_head.weight"):
        check_compatibility(Job(), {"base": _meta(), "tuned": tuned})


def test_tied_donor_with_an_untied_parent_gains_the_head_and_unties():
    base = _without(_meta(), "lm_head.weight", tie_word_embeddings=True)
    check_compatibility(Job(), {"base": base, "tuned": _meta()})
    layout = output_layout(base, [base, _meta()])
    assert layout.tensors["lm_head.weight"] == base.tensors["model.embed_tokens.weight"]
    assert layout.config["tie_word_embeddings"] is False
    assert tensor_sources(layout, base)["lm_head.weight"] == "model.embed_tokens.weight"
    assert ignored_extras(layout, _meta()) == ([], [])


def test_tied_donor_keeps_its_layout_among_tied_parents():
    base = _without(_meta(), "lm_head.weight", tie_word_embeddings=True)
    # A head stored beside tie_word_embeddings: true is the embedding again, not a reason to untie.
    tied_with_copy = ModelMetadata(config={**_meta().config, "tie_word_embeddings": True},
                                   tensors=_meta().tensors)
    assert output_layout(base, [base, tied_with_copy]) is base
    assert ignored_extras(base, tied_with_copy) == (["lm_head.weight"], [])


def test_optional_buffers_are_ignored_other_extras_are_named():
    rotary = "model.layers.0.self_attn.rotary_emb.inv_freq"
    check_compatibility(Job(), {"base": _meta(), "tuned": _with(_meta(), rotary)})
    with pytest.raises(IncompatibleModelsError, match="'tuned' lacks tensor " + rotary):
        check_compatibility(Job(), {"base": _with(_meta(), rotary), "tuned": _meta()})
    gate = "model.layers.0.mlp.gate_proj.weight"
    with pytest.raises(IncompatibleModelsError, match=f"'tuned' has tensor {gate} that 'base'"):
        check_compatibility(Job(), {"base": _meta(), "tuned": _with(_meta(), gate)})


def test_tokenizer_source_allows_different_vocabularies():
    check_compatibility(Job(tokenizer_source="union"), {"base": _meta(), "tuned": _meta(vocab=48)})


def test_base_is_required_by_the_method():
    with pytest.raises(MergefileError, match="task_arithmetic needs a base_model"):
        check_compatibility(Job(base=None, donor="tuned"), {"tuned": _meta()})


def test_slice_range_beyond_the_parent():
    job = Job(base=None, slices=(SimpleNamespace(sources=(("tuned", (0, 3), {}),)),),
              method=Method("passthrough", "none"))
    with pytest.raises(IncompatibleModelsError, match=r"\[0, 3\) is out of range: 'tuned' has 2"):
        check_compatibility(job, {"tuned": _meta()})


def test_layer_count_and_vocab_from_tensors_without_config():
    meta = _meta(layers=3, vocab=40, config=False)
    assert layer_count(meta) == 3
    assert vocab_size(meta) == 40


def test_slices_of_a_model_with_several_layer_stacks_are_refused():
    vlm = ModelMetadata(
        config={"model_type": "llava"},
        tensors={"language_model.model.layers.0.mlp.up_proj.weight": ("F32", (8, 4)),
                 "vision_tower.encoder.layers.0.mlp.fc1.weight": ("F32", (8, 4))})
    job = Job(base=None, slices=(SimpleNamespace(sources=(("tuned", (0, 1), {}),)),),
              method=Method("passthrough", "none"))
    with pytest.raises(IncompatibleModelsError,
                       match="'tuned' has 2 layer stacks \\(language_model.model.layers, "
                             "vision_tower.encoder.layers\\)"):
        check_compatibility(job, {"tuned": vlm})
