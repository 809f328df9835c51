"""Tests for mergebuild.compat: merge compatibility from configs and tensor tables alone."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from mergebuild.compat import ModelMetadata, check_compatibility, layer_count, vocab_size
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


def test_missing_tensor_is_named():
    tuned = _meta()
    tensors = dict(tuned.tensors)
    del tensors["lm_head.weight"]
    with pytest.raises(IncompatibleModelsError, match="'tuned' lacks tensor lm_head.weight"):
        check_compatibility(Job(), {"base": _meta(), "tuned": ModelMetadata(tuned.config, tensors)})


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
