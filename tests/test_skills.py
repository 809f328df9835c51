"""The trained skill family: tokenizer, plain-torch Llama forward, determinism, shipped data."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mergebuild.sources import skills
from mergebuild.sources.skills import (
    FAMILY,
    SKILL_DATA,
    SKILLS,
    WEIGHTS_DIR,
    Training,
    encode,
    eval_examples,
    generate_skill_models,
    skill_examples,
    train_model,
    write_skill_data,
)


@pytest.fixture(scope="session")
def skill_models(tmp_path_factory):
    return generate_skill_models(tmp_path_factory.mktemp("skills") / "models")


def test_tokenizer_json_encodes_like_encode(skill_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(skill_models["base"])
    for text in ("47+8=55", "close ([{< ", "Q: Ann has a red hat. What color?\nA: red", "é ü €"):
        assert tokenizer(text)["input_ids"] == encode(text)
        assert tokenizer.decode(encode(text), skip_special_tokens=True) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)


def test_plain_torch_forward_equals_transformers_llama(skill_models):
    from transformers import LlamaForCausalLM

    state = load_file(skill_models["math"] / "model.safetensors")
    ours = skills.build_model()
    ours.load_state_dict({k: v.float() for k, v in state.items()})
    reference = LlamaForCausalLM.from_pretrained(skill_models["math"], dtype=torch.float32)
    ids = torch.tensor([encode("12+7=19 and Q: Bob has a tan cup. What color?\nA: tan")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_training_repeats_bytes_and_restores_torch_settings():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    short = Training("math", steps=6, batch_size=8, learning_rate=2e-3, seed=9, replay=2)
    first, loss_a = train_model(short)
    second, loss_b = train_model(short)
    assert loss_a == loss_b
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_family_shares_one_shape_and_fine_tunes_moved_from_base():
    base = load_file(WEIGHTS_DIR / "base.safetensors")
    for name in FAMILY:
        tensors = load_file(WEIGHTS_DIR / f"{name}.safetensors")
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in base.items()}
        assert all(v.dtype == torch.bfloat16 for v in tensors.values())
        if name != "base":
            moved = max((tensors[k].float() - base[k].float()).abs().max() for k in base)
            assert 0 < moved < 1.0  # a fine-tune of the base, not a stranger


def test_shipped_eval_data_is_what_the_generator_writes(tmp_path):
    write_skill_data(tmp_path)
    shipped = sorted(p.name for p in SKILL_DATA.iterdir())
    assert shipped == sorted(p.name for p in tmp_path.iterdir())
    for name in shipped:
        assert (SKILL_DATA / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_eval_prompts_are_held_out_of_training():
    for skill in SKILLS:
        held_out = {p for p, _ in eval_examples(skill)}
        assert len(held_out) == 200
        stream = skill_examples(skill, seed=1)
        trained = {next(stream)[0] for _ in range(3000)}
        assert not held_out & trained, skill
    lines = (SKILL_DATA / "chat_choices.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(r["answer"] in r["choices"] and len(r["choices"]) == 4 for r in rows)


def test_generate_skill_models_is_idempotent(skill_models):
    before = {name: (d / "model.safetensors").stat().st_mtime_ns
              for name, d in skill_models.items()}
    again = generate_skill_models(skill_models["base"].parent)
    assert again == skill_models
    assert {n: (d / "model.safetensors").stat().st_mtime_ns for n, d in again.items()} == before
    config = json.loads((skill_models["code"] / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"]) == (
        "llama", 260, 4)
