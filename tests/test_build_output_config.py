"""Tests for mergebuild.build.output_config: the config.json a build writes."""

from __future__ import annotations

from mergebuild.build.output_config import StackedRange, output_config

SLIDING, FULL = "sliding_attention", "full_attention"


def _qwen(layers: int, kinds: list[str], **extra) -> dict:
    return {"model_type": "qwen3", "num_hidden_layers": layers, "layer_types": kinds,
            "architectures": ["Qwen3ForCausalLM"], **extra}


def test_a_stack_slices_per_layer_lists_with_their_layers():
    a = _qwen(4, [SLIDING, FULL, SLIDING, FULL])
    b = _qwen(4, [FULL, FULL, FULL, SLIDING])
    out = output_config(a, stack=[StackedRange(a, 0, 3), StackedRange(b, 2, 4)])
    assert out["num_hidden_layers"] == 5
    assert out["layer_types"] == [SLIDING, FULL, SLIDING, FULL, SLIDING]
    assert out["architectures"] == ["Qwen3ForCausalLM"]
    assert a["num_hidden_layers"] == 4  # the donor's config is not modified


def test_every_list_as_long_as_the_depth_is_per_layer():
    a = _qwen(2, [FULL, FULL], rope_scaling_per_layer=[1.0, 2.0], eos_token_id=[7, 8],
              suppress_tokens=[1, 2, 3])
    out = output_config(a, stack=[StackedRange(a, 0, 2), StackedRange(a, 1, 2)])
    assert out["rope_scaling_per_layer"] == [1.0, 2.0, 2.0]
    assert out["eos_token_id"] == [7, 8]  # token ids, however many
    assert out["suppress_tokens"] == [1, 2, 3]


def test_one_layer_models_keep_their_architectures():
    a = _qwen(1, [FULL])
    out = output_config(a, stack=[StackedRange(a, 0, 1), StackedRange(a, 0, 1)])
    assert out["architectures"] == ["Qwen3ForCausalLM"]
    assert out["layer_types"] == [FULL, FULL]


def test_layer_index_lists_are_renumbered():
    a = {"model_type": "qwen2_moe", "num_hidden_layers": 4, "mlp_only_layers": [1, 3]}
    b = {"model_type": "qwen2_moe", "num_hidden_layers": 4, "mlp_only_layers": [0]}
    out = output_config(a, stack=[StackedRange(a, 1, 4), StackedRange(b, 0, 2)])
    # output layers: a1 a2 a3 b0 b1 → dense MLP at a1, a3, b0
    assert out["mlp_only_layers"] == [0, 2, 3]


def test_untied_head_and_dtype():
    donor = {"model_type": "gemma2", "tie_word_embeddings": True, "dtype": "bfloat16",
             "text_config": {"tie_word_embeddings": True}}
    out = output_config(donor, untie_head=True, out_dtype="float32")
    assert out["tie_word_embeddings"] is False
    assert out["text_config"]["tie_word_embeddings"] is False
    assert out["torch_dtype"] == out["dtype"] == "float32"
    assert output_config(donor) == donor
