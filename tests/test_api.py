"""The make loop: incremental rebuilds, reasons, early cutoff, cosmetic edits, interruption."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHAIN, outcomes
from safetensors.torch import load_file

from mergebuild.errors import BuildInterrupted, StoreError


def _build(ws):
    return ws.project().make(["final-model"])


def test_first_make_builds_every_merge_node(workspace):
    workspace.chain()
    result = _build(workspace)
    assert outcomes(result) == {
        "base-instruct": "built", "chat-code": "built", "final-model": "built",
    }
    final = workspace.project().path("final-model")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "provenance.json",
                 "README.md"):
        assert (final / name).is_file(), name


def test_second_make_is_a_noop_that_reads_no_weight_bytes(workspace, monkeypatch):
    workspace.chain()
    _build(workspace)

    import mergebuild.build.engine
    import mergebuild.io.hashing

    def no_read(*_a, **_k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(mergebuild.io.hashing, "file_xxh128", no_read)
    monkeypatch.setattr(mergebuild.build.engine, "run_build", no_read)
    result = _build(workspace)
    assert set(outcomes(result).values()) == {"fresh"}


def test_parameter_edit_rebuilds_the_node_and_its_descendants_with_reasons(workspace):
    workspace.chain()
    _build(workspace)
    workspace.write(CHAIN.replace("{{t: 0.4}}", "{{t: 0.5}}"))
    project = workspace.project()
    plan = {s.name: s for s in project.plan(["final-model"])}
    assert plan["chat-code"].status == "stale"
    assert plan["chat-code"].reasons == ["parameter changed: t 0.4 → 0.5"]
    assert plan["final-model"].status == "stale"
    assert plan["final-model"].reasons == ["parent changed: chat-code (stale)"]
    assert plan["base-instruct"].status == "fresh"
    result = project.make(["final-model"])
    assert outcomes(result) == {
        "base-instruct": "fresh", "chat-code": "built", "final-model": "built",
    }


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace("models:\n  base:", "# a comment\nmodels:\n  base:"),
        lambda t: t.replace("    parameters: {{t: 0.4}}\n", "    parameters: {{t: 0.4}}\n"
                            "    description: chat with some code\n"),
        # key order inside a node
        lambda t: t.replace("    merge_method: slerp\n    base_model: chat\n",
                            "    base_model: chat\n    merge_method: slerp\n"),
        # renaming a node (and its uses)
        lambda t: t.replace("chat-code", "chat-plus-code"),
        # writing a default explicitly
        lambda t: t.replace("    merge_method: ties\n",
                            "    merge_method: ties\n    parameters: {{normalize: true}}\n"),
    ],
    ids=["comment", "description", "key-order", "rename", "explicit-default"],
)
def test_cosmetic_edits_rebuild_nothing(workspace, edit):
    workspace.chain()
    _build(workspace)
    workspace.write(edit(CHAIN))
    project = workspace.project()
    target = "final-model"
    assert all(s.status != "stale" for s in project.plan([target]))
    assert all(v == "fresh" for v in outcomes(project.make([target])).values())


def test_identical_rebuilt_bytes_stop_the_cascade(workspace):
    text = CHAIN.replace(
        "  chat-code:\n    merge_method: slerp\n    base_model: chat\n"
        "    models: [{{model: chat}}, {{model: code}}]\n    parameters: {{t: 0.4}}\n",
        "  chat-code:\n    merge_method: linear\n"
        "    models: [{{model: chat, parameters: {{weight: 1.0}}}},"
        " {{model: code, parameters: {{weight: 1.0}}}}]\n",
    )
    workspace.write(text)
    _build(workspace)
    # (2a + 2b) / 4 == (a + b) / 2 exactly: a new recipe with identical output bytes.
    workspace.write(text.replace("weight: 1.0}}}}", "weight: 2.0}}}}"))
    result = workspace.project().make(["final-model"])
    assert outcomes(result) == {
        "base-instruct": "fresh", "chat-code": "built", "final-model": "reused",
    }
    assert "early cutoff" in next(r.detail for r in result.results if r.name == "final-model")


def test_deleted_output_is_rebuilt_with_reason(workspace):
    from mergebuild.store.objects import remove_tree

    workspace.chain()
    _build(workspace)
    project = workspace.project()
    remove_tree(project.path("base-instruct"))
    plan = {s.name: s for s in workspace.project().plan(["final-model"])}
    assert plan["base-instruct"].reasons == ["output missing from the store"]
    result = workspace.project().make(["final-model"])
    # Same bytes again: the child is found by its unchanged key.
    assert outcomes(result)["base-instruct"] == "built"
    assert outcomes(result)["final-model"] == "reused"


def test_new_node_reason(workspace):
    workspace.chain()
    plan = {s.name: s for s in workspace.project().plan(["final-model"])}
    assert plan["chat-code"].reasons == ["new node"]
    assert plan["base"].status == "source"


def test_path_of_unbuilt_node_fails(workspace):
    workspace.chain()
    with pytest.raises(StoreError, match="not built"):
        workspace.project().path("final-model")


def test_interrupted_build_publishes_nothing_and_next_make_finishes(workspace, monkeypatch):
    from mergebuild.build import engine

    workspace.chain()
    real = engine.run_build
    calls = {"n": 0}

    def interrupt(job, out_dir, progress=None):
        def boom(done, total, *_):
            calls["n"] += 1
            if done == total // 2:
                raise KeyboardInterrupt
        return real(job, out_dir, boom)

    monkeypatch.setattr(engine, "run_build", interrupt)
    with pytest.raises(BuildInterrupted):
        workspace.project().make(["final-model"])
    monkeypatch.setattr(engine, "run_build", real)
    store = workspace.project().store
    assert list(store.iter_objects()) == []
    assert not any(store.tmp.iterdir())
    result = workspace.project().make(["final-model"])
    assert outcomes(result) == {
        "base-instruct": "built", "chat-code": "built", "final-model": "built",
    }


def test_output_is_float_merge_of_parents(workspace, demo_models):
    workspace.write("""\
        version: 1
        models:
          a: {{source: {models}/chat}}
          b: {{source: {models}/code}}
          avg:
            merge_method: linear
            models:
              - {{model: a, parameters: {{weight: 1.0}}}}
              - {{model: b, parameters: {{weight: 3.0}}}}
            dtype: float32
        """)
    project = workspace.project()
    project.make(["avg"])
    out = load_file(project.path("avg") / "model.safetensors")
    a = load_file(demo_models["chat"] / "model.safetensors")
    b = load_file(demo_models["code"] / "model.safetensors")
    for name, tensor in out.items():
        assert tensor.dtype == torch.float32
        expected = (a[name].float() * 1.0 + b[name].float() * 3.0) / 4.0
        torch.testing.assert_close(tensor, expected)
    config = json.loads((project.path("avg") / "config.json").read_text())
    assert config["torch_dtype"] == "float32"


def test_passthrough_slices_stack_layers(workspace, demo_models):
    workspace.write("""\
        version: 1
        models:
          a: {{source: {models}/chat}}
          b: {{source: {models}/code}}
          stacked:
            merge_method: passthrough
            slices:
              - sources: [{{model: a, layer_range: [0, 3]}}]
              - sources: [{{model: b, layer_range: [1, 4]}}]
        """)
    project = workspace.project()
    project.make(["stacked"])
    out_dir = project.path("stacked")
    out = load_file(out_dir / "model.safetensors")
    a = load_file(demo_models["chat"] / "model.safetensors")
    b = load_file(demo_models["code"] / "model.safetensors")
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 6
    key = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(out[key.format(2)], a[key.format(2)])
    torch.testing.assert_close(out[key.format(3)], b[key.format(1)])
    torch.testing.assert_close(out[key.format(5)], b[key.format(3)])
    torch.testing.assert_close(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    torch.testing.assert_close(out["lm_head.weight"], b["lm_head.weight"])
    assert not any("layers.6." in n for n in out)


def test_built_model_loads_with_transformers(workspace):
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) absent")
    workspace.chain()
    _build(workspace)
    path = workspace.project().path("final-model")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ids = tokenizer("hello merge", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()


def test_large_output_is_sharded_with_an_index_and_loads(workspace):
    transformers = pytest.importorskip("transformers", reason="transformers (test extra) absent")
    workspace.write(CHAIN.replace("  dtype: bfloat16\n", "  dtype: bfloat16\n  max_shard_size: 100000\n"))
    project = workspace.project()
    project.make(["chat-code"])
    out = project.path("chat-code")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = load_file(next(iter(sorted(out.glob("model-00001-*.safetensors")))))
    name, tensor = next(iter(reference.items()))
    torch.testing.assert_close(model.state_dict()[name], tensor)
