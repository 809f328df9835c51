"""Tests for mergebuild.sources.demo: real-format, deterministic, idempotent demo checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mergebuild.io.checkpoint import INDEX_NAME, CheckpointReader
from mergebuild.sources.demo import DEMO_MODELS, MARKER_NAME, Delta, generate_demo_models, generate_model

LAYERS = 4


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    generate_demo_models(root)
    return root


def _file_digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _expected_names(num_layers: int) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(num_layers):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
        names += [f"model.layers.{i}.{n}_layernorm.weight" for n in ("input", "post_attention")]
    return sorted(names)


def test_demo_family_has_every_model(demo_root):
    assert sorted(p.name for p in demo_root.iterdir()) == sorted(DEMO_MODELS)
    for name in DEMO_MODELS:
        files = {p.name for p in (demo_root / name).iterdir()}
        assert {
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "model.safetensors",
            MARKER_NAME,
        } <= files


def test_demo_tensors_have_hf_llama_names_shapes_and_dtype(demo_root):
    with CheckpointReader(demo_root / "base") as reader:
        assert list(reader.tensors) == _expected_names(LAYERS)
        assert {info.dtype for info in reader.tensors.values()} == {"BF16"}
        shapes = {name: info.shape for name, info in reader.tensors.items()}
        config = reader.config
    assert shapes["model.embed_tokens.weight"] == (256, 64)
    assert shapes["lm_head.weight"] == (256, 64)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (32, 64)  # 2 kv heads × 16
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (64, 128)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
        64,
        LAYERS,
        256,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)


def test_finetunes_share_base_and_differ_from_it(demo_root):
    readers = {name: CheckpointReader(demo_root / name) for name in DEMO_MODELS}
    name = "model.layers.1.mlp.up_proj.weight"
    base = readers["base"].load(name).float()
    vectors = {n: readers[n].load(name).float() - base for n in DEMO_MODELS if n != "base"}
    for model, vector in vectors.items():
        assert vector.abs().max() > 0, model
    # Task vectors are different per model, and code's is sparse (about 10 % of elements).
    assert not torch.equal(vectors["instruct"], vectors["math"])
    code_density = (vectors["code"] != 0).float().mean().item()
    assert 0.05 < code_density < 0.15
    assert (vectors["instruct"] != 0).float().mean().item() > 0.9


def test_chat_continues_from_instruct(demo_root):
    name = "model.layers.0.self_attn.q_proj.weight"
    base, instruct, chat = (
        CheckpointReader(demo_root / m).load(name).float() for m in ("base", "instruct", "chat")
    )
    cos = torch.nn.functional.cosine_similarity(
        (instruct - base).flatten(), (chat - base).flatten(), dim=0
    )
    assert cos > 0.5


def test_focus_layers_change_more(demo_root):
    base = CheckpointReader(demo_root / "base")
    code = CheckpointReader(demo_root / "code")

    def change(layer: int) -> float:
        name = f"model.layers.{layer}.mlp.gate_proj.weight"
        return (code.load(name).float() - base.load(name).float()).norm().item()

    # code focuses layers 0 and 1 with gain 4.
    assert change(0) > 2 * change(3)
    assert change(1) > 2 * change(2)


def test_generation_is_deterministic(tmp_path, demo_root):
    generate_model(tmp_path / "again", 0, deltas=DEMO_MODELS["math"])
    ours = _file_digests(tmp_path / "again")
    assert ours == _file_digests(demo_root / "math")


def test_second_generation_writes_nothing(tmp_path):
    generate_demo_models(tmp_path, num_layers=1, hidden_size=16, intermediate_size=32)
    before = _mtimes(tmp_path)
    paths = generate_demo_models(tmp_path, num_layers=1, hidden_size=16, intermediate_size=32)
    assert _mtimes(tmp_path) == before
    assert paths == {name: tmp_path / name for name in DEMO_MODELS}
    assert (tmp_path / "base").stat().st_mode & 0o777 == 0o755


def test_changed_parameters_regenerate_in_place(tmp_path):
    generate_model(tmp_path / "m", 0, num_layers=1, hidden_size=16, intermediate_size=32)
    generate_model(tmp_path / "m", 0, num_layers=2, hidden_size=16, intermediate_size=32)
    with CheckpointReader(tmp_path / "m") as reader:
        assert list(reader.tensors) == _expected_names(2)
    marker = json.loads((tmp_path / "m" / MARKER_NAME).read_text())
    assert marker["num_layers"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp or old directories left


def test_half_written_model_is_replaced(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"partial")
    generate_model(target, 0, num_layers=1, hidden_size=16, intermediate_size=32)
    assert CheckpointReader(target).tensors


def test_sharded_generation_writes_index(tmp_path):
    generate_model(
        tmp_path / "m", 0, num_layers=2, hidden_size=16, intermediate_size=32, max_shard_bytes=4096
    )
    index = json.loads((tmp_path / "m" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "m" / "model.safetensors").exists()
    with CheckpointReader(tmp_path / "m") as reader:
        assert list(reader.tensors) == _expected_names(2)


def test_incompatible_variants(tmp_path):
    generate_model(tmp_path / "wide_vocab", 0, vocab_size=300, num_layers=1)
    generate_model(tmp_path / "f16", 0, num_layers=1, dtype="float16")
    wide = CheckpointReader(tmp_path / "wide_vocab")
    assert wide.tensors["model.embed_tokens.weight"].shape == (300, 64)
    assert wide.config["vocab_size"] == 300
    assert CheckpointReader(tmp_path / "f16").tensors["lm_head.weight"].dtype == "F16"


def test_same_seed_and_shape_share_base_weights(tmp_path):
    generate_model(tmp_path / "a", 5, num_layers=1)
    generate_model(tmp_path / "b", 5, num_layers=1, deltas=[Delta(seed=9, density=0.2)])
    a, b = CheckpointReader(tmp_path / "a"), CheckpointReader(tmp_path / "b")
    name = "model.layers.0.self_attn.o_proj.weight"
    differs = (a.load(name) != b.load(name)).float().mean().item()
    assert 0.1 < differs < 0.3


def test_invalid_parameters_are_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_heads"):
        generate_model(tmp_path / "m", 0, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="dtype must be one of"):
        generate_model(tmp_path / "m", 0, dtype="int8")


def test_tokenizer_json_is_a_valid_tokenizer(demo_root):
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    tokenizer = tokenizers.Tokenizer.from_file(str(demo_root / "base" / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 256
    encoding = tokenizer.encode("Merge the models, then test 42!")
    assert encoding.ids[0] == 1  # <s>
    assert all(0 <= i < 256 for i in encoding.ids)
    assert tokenizer.decode(encoding.ids) == "Merge the models, then test 42!"


def test_demo_models_load_with_transformers(demo_root):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo_root / "chat")
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_root / "chat")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.bfloat16
    expected = CheckpointReader(demo_root / "chat").load("model.layers.3.mlp.down_proj.weight")
    torch.testing.assert_close(model.model.layers[3].mlp.down_proj.weight.detach(), expected)
    inputs = tokenizer("Hello world, merge the models!", return_tensors="pt")
    assert inputs.input_ids[0, 0].item() == tokenizer.bos_token_id == 1
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs.input_ids.shape[1], 256)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(inputs.input_ids[0], skip_special_tokens=True) == (
        "Hello world, merge the models!"
    )


def test_sharded_demo_loads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    generate_model(tmp_path / "m", 0, num_layers=2, max_shard_bytes=20_000)
    assert (tmp_path / "m" / INDEX_NAME).exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()


def test_demo_adapter_is_a_deterministic_peft_lora(tmp_path):
    from safetensors.torch import load_file

    from mergebuild.sources.demo import DEMO_ADAPTERS, generate_demo_adapters
    from mergebuild.io.lora import check_adapter_directory

    first = generate_demo_adapters(tmp_path / "a")
    second = generate_demo_adapters(tmp_path / "b")
    assert set(first) == set(DEMO_ADAPTERS) == {"style-lora"}
    for name, directory in first.items():
        check_adapter_directory(directory, name)
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert (directory / file).read_bytes() == (second[name] / file).read_bytes()
    tensors = load_file(str(first["style-lora"] / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"].shape == (32, 4)
    mtime = (first["style-lora"] / "adapter_model.safetensors").stat().st_mtime_ns
    generate_demo_adapters(tmp_path / "a")  # a second call writes nothing
    assert (first["style-lora"] / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_demo_adapter_on_a_merge_output_adds_its_delta(tmp_path):
    """recipes/merge-plus-lora: `styled` is chat-code plus B·A·α/r on q_proj and v_proj, and
    bit-identical to chat-code everywhere else; gc keeps the adapter's demo directory."""
    import json

    from safetensors.torch import load_file
    from torch.testing import assert_close

    from mergebuild.api import Project

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "merge-plus-lora.Mergefile"
    project = Project(recipe, tmp_path / "cache")
    assert project.make(["styled"]).ok
    merged = load_file(str(project.path("chat-code") / "model.safetensors"))
    styled = load_file(str(project.path("styled") / "model.safetensors"))
    adapter = next((tmp_path / "cache" / "demo").glob("*/style-lora"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    changed = 0
    for name, tensor in merged.items():
        module = "base_model.model." + name.removesuffix(".weight")
        if module + ".lora_A.weight" in lora:
            delta = lora[module + ".lora_B.weight"] @ lora[module + ".lora_A.weight"] * scale
            assert_close(styled[name].float(), tensor.float() + delta, rtol=1 / 128, atol=1e-6)
            assert not torch.equal(styled[name], tensor)
            changed += 1
        else:
            assert torch.equal(styled[name], tensor), name
    assert changed == 8  # q_proj and v_proj of 4 layers
    report = project.collect_garbage()
    assert not [g for g in report.removed if g.kind == "demo"]
    assert adapter.is_dir()
