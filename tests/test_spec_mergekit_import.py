"""mergebuild import: mergekit configs and mergekit-multi files become a valid Mergefile."""

from __future__ import annotations

import textwrap

from click.testing import CliRunner

from mergebuild.cli import main
from mergebuild.spec.graph import build_graph
from mergebuild.spec.mergekit_import import import_mergekit
from mergebuild.spec.model import MergeSpec
from mergebuild.spec.parse import load_mergefile


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_single_config_round_trips(tmp_path, demo_models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path / "ties.yml", f"""
        merge_method: ties
        base_model: {demo_models['base']}
        models:
          - model: {demo_models['instruct']}
            parameters: {{weight: 0.5, density: [0.2, 0.8]}}
          - model: mistralai/Mistral-7B-v0.1@main
            parameters: {{weight: 0.5, density: 0.5}}
        parameters: {{normalize: true}}
        dtype: bfloat16
        int8_mask: true
        """)
    result = import_mergekit([cfg], tmp_path)
    assert any("int8_mask" in w for w in result.warnings)
    (tmp_path / "Mergefile").write_text(result.text)
    mf = load_mergefile(tmp_path / "Mergefile")
    node = mf.nodes["ties"]
    assert isinstance(node, MergeSpec) and node.method == "ties" and node.base == "base"
    assert mf.nodes["Mistral-7B-v0.1"].uri == "hf://mistralai/Mistral-7B-v0.1@main"
    assert mf.nodes["base"].uri == str(demo_models["base"])
    assert dict(node.models[0].parameters) == {"weight": 0.5, "density": [0.2, 0.8]}


def test_multi_document_chain_becomes_a_dag(tmp_path, demo_models, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path / "multi.yml", f"""
        name: stage1
        merge_method: slerp
        base_model: {demo_models['base']}
        models: [{{model: {demo_models['base']}}}, {{model: {demo_models['chat']}}}]
        parameters: {{t: 0.5}}
        ---
        name: final
        merge_method: linear
        models:
          - {{model: stage1, parameters: {{weight: 1}}}}
          - {{model: {demo_models['math']}+./lora, parameters: {{weight: 1}}}}
        tokenizer_source: base
        """)
    runner = CliRunner()
    result = runner.invoke(main, ["import", str(cfg), "-o", str(tmp_path / "Mergefile")],
                           obj={})
    assert result.exit_code == 0, result.output
    g = build_graph(load_mergefile(tmp_path / "Mergefile"))
    assert ("stage1", "final") in g.edges
    assert ("math+./lora", "final") in g.edges  # the reference names the node
    adapted = g.nodes["math+./lora"]["spec"]
    assert adapted.adapter == str(tmp_path / "lora")
    assert adapted.uri == str(demo_models["math"])


def test_unknown_keys_are_reported_on_stderr(tmp_path, demo_models):
    cfg = _write(tmp_path / "m.yml", f"""
        merge_method: linear
        models: [{{model: {demo_models['base']}, parameters: {{weight: 1}}}}]
        normalise: true
        """)
    result = CliRunner().invoke(main, ["import", str(cfg)], obj={})
    assert result.exit_code == 0
    assert "unknown mergekit key 'normalise'" in result.stderr
    assert result.stdout.count("merge_method: linear") == 1
