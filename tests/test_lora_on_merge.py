"""A PEFT LoRA applied to a merge node's output (``chat-code+./lora`` as a parent)."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch
from conftest import CHAIN, outcomes
from safetensors.torch import load_file
from test_io_lora import write_adapter

from mergebuild.errors import MergefileError, StoreError

ADAPTER_COMMIT = "c0" * 20


def _chain(ws, adapter: str) -> str:
    """The test chain with final-model reading chat-code through ``adapter``."""
    text = CHAIN.replace("      - model: chat-code\n", f"      - model: chat-code+{adapter}\n")
    assert text != CHAIN
    ws.write(text)
    return text


def _states(project, target="final-model"):
    return {s.name: s for s in project.plan([target])}


def _tensors(directory):
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture
def lora(tmp_path, demo_models):
    path = tmp_path / "style-lora"
    write_adapter(path, demo_models["base"], 7)
    return path


def test_merge_then_adapter_as_a_source_gives_the_same_bytes(workspace, lora, tmp_path):
    _chain(workspace, lora)
    project = workspace.project()
    assert outcomes(project.make()) == {
        "base-instruct": "built", "chat-code": "built", "final-model": "built"}
    final = project.path("final-model")
    # The same merge, its parents now plain directories: chat-code's build read through the
    # adapter as a source (today's adapted-source path).
    other = tmp_path / "other"
    other.mkdir()
    (other / "Mergefile").write_text(textwrap.dedent(f"""\
        version: 1
        defaults: {{dtype: bfloat16}}
        models:
          base: {{source: {workspace.models}/base}}
          math: {{source: {workspace.models}/math}}
          bi: {{source: {project.path("base-instruct")}}}
          cc: {{source: {project.path("chat-code")}}}
          final-model:
            merge_method: ties
            base_model: base
            models:
              - model: bi
                parameters: {{weight: 0.5, density: 0.6}}
              - model: cc+{lora}
                parameters: {{weight: 0.3, density: 0.6}}
              - model: math
                parameters: {{weight: 0.2, density: 0.5}}
        """))
    from mergebuild.api import Project

    reference = Project(other / "Mergefile", other / "cache")
    reference.make(["final-model"])
    expected = reference.path("final-model") / "model.safetensors"
    assert (final / "model.safetensors").read_bytes() == expected.read_bytes()
    # ...and the adapter did change the output: without it the bytes differ.
    workspace.chain()
    plain = workspace.project()
    plain.make(["final-model"])
    assert (plain.path("final-model") / "model.safetensors").read_bytes() != expected.read_bytes()


def test_the_delta_is_added_to_the_merge_output(workspace, demo_models, tmp_path):
    deltas = write_adapter(tmp_path / "l", demo_models["base"], 3)
    workspace.mergefile.write_text(textwrap.dedent(f"""\
    version: 1
    models:
      chat: {{source: {workspace.models}/chat}}
      code: {{source: {workspace.models}/code}}
      chat-code:
        merge_method: slerp
        base_model: chat
        models: [{{model: chat}}, {{model: code}}]
        parameters: {{t: 0.4}}
      styled:
        merge_method: linear
        models: [{{model: chat-code+{tmp_path / 'l'}, parameters: {{weight: 1.0}}}}]
        dtype: float32
    """))
    project = workspace.project()
    project.make(["styled"])
    merged = _tensors(project.path("chat-code"))
    out = _tensors(project.path("styled"))
    assert set(deltas) < set(out)
    for name, tensor in merged.items():
        torch.testing.assert_close(out[name], tensor.float() + deltas.get(name, 0),
                                   rtol=0, atol=1e-6)


def test_incremental_rebuilds(workspace, lora, demo_models, tmp_path, monkeypatch):
    text = _chain(workspace, lora)
    ref = f"chat-code+{lora}"
    workspace.project().make()
    # editing the merge: the merge and the child rebuild; the adapted node waits on it
    workspace.write(text.replace("{{t: 0.4}}", "{{t: 0.5}}"))
    project = workspace.project()
    plan = _states(project)
    assert plan["chat-code"].status == "stale"
    assert (plan[ref].kind, plan[ref].status, plan[ref].digest) == ("adapted", "pending", None)
    assert plan[ref].reasons == ["waits for chat-code (stale)"]
    assert plan["final-model"].reasons == [f"parent changed: {ref} (stale)"]
    assert outcomes(project.make()) == {
        "base-instruct": "fresh", "chat-code": "built", "final-model": "built"}
    # another adapter in the same place: only the child rebuilds
    write_adapter(tmp_path / "other-lora", demo_models["base"], 8)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copyfile(tmp_path / "other-lora" / name, lora / name)
    project = workspace.project()
    plan = _states(project)
    assert plan["chat-code"].status == "fresh" and plan[ref].status == "fresh"
    assert plan["final-model"].reasons == [f"parent changed: {ref}"]
    assert outcomes(project.make()) == {
        "base-instruct": "fresh", "chat-code": "fresh", "final-model": "built"}
    # a no-op make plans from metadata alone and builds nothing
    import mergebuild.build.engine
    import mergebuild.io.hashing

    def no_read(*_a, **_k):
        raise AssertionError("weights were read")

    with monkeypatch.context() as patch:
        patch.setattr(mergebuild.io.hashing, "file_xxh128", no_read)
        patch.setattr(mergebuild.build.engine, "run_build", no_read)
        assert set(outcomes(workspace.project().make()).values()) == {"fresh"}


def test_merge_rebuilt_to_the_same_bytes_reuses_the_child(workspace, lora):
    from mergebuild.store.objects import remove_tree

    _chain(workspace, lora)
    workspace.project().make()
    remove_tree(workspace.project().path("chat-code"))
    project = workspace.project()
    plan = _states(project)
    assert plan[f"chat-code+{lora}"].status == "pending"
    assert plan["final-model"].status == "stale"
    result = project.make()
    assert outcomes(result) == {
        "base-instruct": "fresh", "chat-code": "built", "final-model": "reused"}
    assert "early cutoff" in next(r.detail for r in result.results if r.name == "final-model")


def test_provenance_lineage_and_card_show_the_adapter(workspace, lora):
    from mergebuild.provenance.integrity import verify_directory
    from mergebuild.provenance.lineage import lineage_to_json, load_lineage

    _chain(workspace, lora)
    project = workspace.project()
    project.make()
    plan = _states(project)
    ref = f"chat-code+{lora}"
    final = project.path("final-model")
    statement = json.loads((final / "provenance.json").read_text())
    definition = statement["predicate"]["buildDefinition"]
    deps = {d["name"]: d for d in definition["resolvedDependencies"]}
    node, adapter = deps["chat-code"], deps[ref + "#adapter"]
    assert node["uri"] == "mergebuild:node/chat-code"
    assert "sha256:" + node["digest"]["sha256"] == plan["chat-code"].digest
    assert node["annotations"]["adapter"] == ref + "#adapter"
    assert node["annotations"]["statement"]["predicate"]["buildDefinition"][
        "externalParameters"]["node"] == "chat-code"
    assert adapter["uri"] == lora.as_uri()
    assert "xxh128:" + adapter["digest"]["xxh128"] == plan[ref].adapter.digest
    assert adapter["annotations"]["appliesTo"] == "chat-code"
    assert adapter["annotations"]["adaptedDigest"] == plan[ref].digest
    assert set(adapter["annotations"]["files"]) == {
        "adapter_config.json", "adapter_model.safetensors"}
    # the recipe holds the combined identity, not the merge's bare digest
    recipe = definition["internalParameters"]["recipe"]
    assert plan[ref].digest in [m["model"] for m in recipe["models"]]
    assert plan["chat-code"].digest not in json.dumps(recipe)
    assert verify_directory(final) == []

    tree = lineage_to_json(load_lineage(final))
    adapted = next(p for p in tree["parents"] if p["name"] == ref)
    assert (adapted["kind"], adapted["method"], adapted["role"]) == ("lora", "lora", "model")
    assert adapted["digest"] == plan[ref].digest
    merge, lora_node = adapted["parents"]
    assert (merge["name"], merge["kind"], merge["method"], merge["role"]) == (
        "chat-code", "node", "slerp", "model")
    assert [p["name"] for p in merge["parents"]] == ["chat", "code"]
    assert (lora_node["name"], lora_node["kind"], lora_node["role"]) == (
        str(lora), "local", "adapter")

    card = (final / "README.md").read_text()
    assert f"| `{ref}` | lora |" in card
    assert f"adapter: `{lora}`" in card
    assert ("3 merge stages, 1 LoRA adapter applied to a merge's output and 6 original "
            "checkpoints") in card
    assert "- lora\n" in card.split("---")[1]  # a tag, like each method


def test_cli_plan_graph_lineage_and_path(workspace, lora):
    from test_cli import run

    _chain(workspace, lora)
    ref = f"chat-code+{lora}"
    lines = run(workspace, "plan", "final-model").output.splitlines()
    row = next(line for line in lines if line.startswith(ref))
    assert "lora" in row and "pending" in row and "waits for chat-code (stale)" in row
    assert lora.as_uri() in row
    assert lines[-1] == "3 to build"
    data = json.loads(run(workspace, "plan", "--json").output)
    assert {d["node"]: d["kind"] for d in data}[ref] == "adapted"

    dot = run(workspace, "graph", "--dot").output
    assert "n_chat_code -> n_chat_code" in dot and f"{ref} (LoRA local on chat-code)" in dot
    assert "hexagon" in dot
    mermaid = run(workspace, "graph", "--mermaid").output
    assert f'{{{{"{ref} (LoRA local on chat-code)"}}}}' in mermaid
    from rich.console import Console

    from mergebuild.spec.graph import render_tree

    console = Console(width=10_000, record=True)
    console.print(render_tree(workspace.project().graph))
    tree = console.export_text()
    assert f"── {ref} (LoRA local on chat-code)\n" in tree
    assert "chat-code (slerp)" in tree.split(ref)[1]  # its merge below it

    assert run(workspace, "make").exit_code == 0
    lineage = run(workspace, "lineage", "final-model").output
    assert f"{ref} lora" in lineage and "(adapter)" in lineage and "chat-code slerp" in lineage
    failed = run(workspace, "path", ref)
    assert failed.exit_code != 0
    assert "has no directory of its own" in failed.output
    assert "mergebuild path chat-code" in failed.output


def test_check_reproduces_a_child_of_an_adapted_merge(workspace, lora):
    _chain(workspace, lora)
    workspace.project().make()
    report = workspace.project().check("final-model")
    assert report.ok and report.files >= 4
    assert report.stored_digest == _states(workspace.project())["final-model"].digest


def test_gc_keeps_the_adapted_merge(workspace, lora):
    _chain(workspace, lora)
    project = workspace.project()
    project.make()
    chat_code = project.path("chat-code")
    report = workspace.project().collect_garbage()
    assert [g for g in report.removed if g.kind == "object"] == []
    assert report.kept == 3 and chat_code.is_dir()
    assert set(outcomes(workspace.project().make()).values()) == {"fresh"}


def test_stacked_adapters_are_a_one_line_error(workspace, lora):
    _chain(workspace, f"{lora}+{lora}")
    with pytest.raises(MergefileError) as caught:
        workspace.project()
    message = str(caught.value)
    assert "stacks two adapters" in message and "\n" not in message
    assert caught.value.node == "final-model" and caught.value.line
    assert not workspace.cache.exists()


def test_missing_adapter_on_a_merge_is_a_one_line_error(workspace, tmp_path):
    from mergebuild.errors import SourceError

    _chain(workspace, tmp_path / "nowhere")
    with pytest.raises(SourceError, match="LoRA adapter directory .*nowhere does not exist"):
        workspace.project().plan(["final-model"])
    assert not (workspace.cache / "objects").exists()


def test_adapter_that_does_not_fit_the_merge_is_a_one_line_error(workspace, demo_models,
                                                                 tmp_path):
    from mergebuild.errors import IncompatibleModelsError

    bad = tmp_path / "bad-lora"
    write_adapter(bad, demo_models["base"], 1,
                  shapes={"model.layers.0.self_attn.q_proj": (64, 32)})
    _chain(workspace, bad)
    project = workspace.project()
    with pytest.raises(IncompatibleModelsError) as caught:
        project.make()
    assert caught.value.node == "final-model"
    assert "LoRA bad-lora does not fit model.layers.0.self_attn.q_proj" in str(caught.value)
    assert _states(workspace.project())["final-model"].status == "stale"
    assert not list((workspace.cache / "tmp").iterdir())


def test_a_merge_with_a_failed_parent_skips_its_adapted_reference(workspace, lora,
                                                                  monkeypatch):
    _chain(workspace, lora)
    import mergebuild.build.engine

    real = mergebuild.build.engine.run_build

    def fail_chat_code(job, *args, **kwargs):
        if job.node == "chat-code":
            raise StoreError("simulated failure", node="chat-code")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(mergebuild.build.engine, "run_build", fail_chat_code)
    result = workspace.project().make(keep_going=True)
    got = {r.name: (r.outcome, r.detail) for r in result.results}
    assert got["chat-code"][0] == "failed"
    assert got[f"chat-code+{lora}"] == ("skipped", "parent 'chat-code' failed")
    assert got["final-model"] == ("skipped", f"parent 'chat-code+{lora}' failed")
    assert got["base-instruct"][0] == "built"


def test_hub_adapter_on_a_merge_offline(workspace, demo_models, tmp_path, monkeypatch):
    """``chat-code+org/style-lora@v1`` from a Hugging Face cache, HF_HUB_OFFLINE=1."""
    from test_sources_hub import offline_hub_cache

    from mergebuild.api import Project

    cache = offline_hub_cache(tmp_path, monkeypatch)
    deltas = write_adapter(tmp_path / "lora", demo_models["base"], 5)
    cache.add_commit("org/style-lora", ADAPTER_COMMIT,
                     {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()})
    cache.set_ref("org/style-lora", "v1", ADAPTER_COMMIT)
    _chain(workspace, "org/style-lora@v1")
    ref = "chat-code+org/style-lora@v1"
    project = workspace.project()
    plan = _states(project)
    assert plan[ref].adapter.commit == ADAPTER_COMMIT
    project.make()
    lock = json.loads((workspace.mergefile.parent / "Mergefile.lock").read_text())
    assert lock["sources"][ref + "#adapter"]["commit"] == ADAPTER_COMMIT
    final = project.path("final-model")
    deps = {d["name"]: d for d in json.loads((final / "provenance.json").read_text())
            ["predicate"]["buildDefinition"]["resolvedDependencies"]}
    adapter = deps[ref + "#adapter"]
    assert adapter["uri"] == "hf://org/style-lora"
    assert adapter["digest"]["gitCommit"] == ADAPTER_COMMIT
    assert adapter["annotations"]["revision"] == "v1"
    assert "org/style-lora" in (final / "README.md").read_text()

    # Same bytes as a local copy of the adapter applied to the same merge.
    from conftest import Workspace

    (tmp_path / "twin").mkdir()
    twin = Workspace(tmp_path / "twin", workspace.models)
    _chain(twin, tmp_path / "lora")
    twin.project().make()
    assert (final / "model.safetensors").read_bytes() == (
        twin.project().path("final-model") / "model.safetensors").read_bytes()
    twin.chain()  # and not the bytes of the merge without it
    twin.project().make()
    assert deltas and (final / "model.safetensors").read_bytes() != (
        twin.project().path("final-model") / "model.safetensors").read_bytes()

    # The tag moves: the child goes stale, unless --frozen keeps the locked commit.
    write_adapter(tmp_path / "lora2", demo_models["base"], 6)
    cache.add_commit("org/style-lora", "c1" * 20,
                     {p.name: p.read_bytes() for p in (tmp_path / "lora2").iterdir()})
    cache.set_ref("org/style-lora", "v1", "c1" * 20)
    plan = _states(workspace.project())
    assert plan["chat-code"].status == "fresh" and plan["final-model"].status == "stale"
    assert any("moved" in r for r in plan[ref].reasons)
    frozen = _states(Project(workspace.mergefile, workspace.cache, frozen=True))
    assert frozen["final-model"].status == "fresh"
    assert frozen[ref].adapter.commit == ADAPTER_COMMIT
