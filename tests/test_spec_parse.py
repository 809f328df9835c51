"""Reading Mergefiles: specs, implicit sources, line numbers and hints in errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergebuild.errors import GraphError, MergefileError
from mergebuild.spec.model import Defaults, MergeSpec, SourceSpec
from mergebuild.spec.parse import parse_mergefile

HERE = Path("/work/project/Mergefile")


def parse(text: str):
    return parse_mergefile(text, HERE)


def test_sources_and_merge_specs():
    mf = parse("""\
version: 1
defaults: {dtype: bf16}
models:
  base: {source: ./models/base}
  hub:  {source: "hf://org/name@v1"}
  out:
    merge_method: slerp
    base_model: base
    models: [{model: base}, {model: hub}]
    parameters: {t: [0, 0.5, 1]}
    dtype: fp16
""")
    assert mf.defaults == Defaults(dtype="bfloat16")  # the alias folded at parse time
    base, hub, out = mf.nodes["base"], mf.nodes["hub"], mf.nodes["out"]
    assert isinstance(base, SourceSpec) and base.uri == "/work/project/models/base"
    assert base.kind == "local" and hub.kind == "hub" and hub.uri == "hf://org/name@v1"
    assert isinstance(out, MergeSpec) and out.method == "slerp" and out.dtype == "float16"
    assert out.parent_refs() == ["base", "hub"]
    assert out.line == 7


def test_paths_and_hub_ids_as_parents_become_implicit_sources():
    mf = parse("""\
version: 1
models:
  out:
    merge_method: linear
    models:
      - {model: ./models/a, parameters: {weight: 1}}
      - {model: org/model-b@main, parameters: {weight: 1}}
""")
    a, b = mf.nodes["./models/a"], mf.nodes["org/model-b@main"]
    assert a.implicit and a.uri == "/work/project/models/a"
    assert b.implicit and b.uri == "hf://org/model-b@main"


def test_errors_carry_file_line_node_and_hint():
    with pytest.raises(MergefileError) as info:
        parse("""\
version: 1
models:
  a: {source: ./a}
  out:
    merge_method: linear
    models:
      - model: a
        parameters: {wieght: 1}
""")
    message = str(info.value)
    assert message == (
        "/work/project/Mergefile:8: node 'out': unknown parameter 'wieght' in a models entry "
        "for linear (did you mean 'weight'?)"
    )


def test_unknown_reference_is_a_graph_error_with_suggestion():
    with pytest.raises(GraphError, match=r"unknown model 'bsae' \(did you mean 'base'\?\)"):
        parse("version: 1\nmodels:\n  base: {source: ./b}\n  out:\n    merge_method: linear\n"
              "    models: [{model: bsae, parameters: {weight: 1}}]\n")


def test_gradient_and_filter_values_validate_each_scalar():
    with pytest.raises(MergefileError, match=r"parameter 'density' must be <= 1.0, got 2"):
        parse("version: 1\nmodels:\n  a: {source: ./a}\n  b: {source: ./b}\n  out:\n"
              "    merge_method: ties\n    base_model: a\n"
              "    models: [{model: b, parameters: {weight: 1}}]\n"
              "    parameters:\n      density: [{filter: mlp, value: [0, 2]}, {value: 0.5}]\n")


def test_ten_thousand_nodes_parse_and_order_in_a_fraction_of_the_old_time(tmp_path):
    """A 10,000-node Mergefile: the YAML is built from libyaml's events (PyYAML's Python
    loader alone took ~10 s CPU) and the order is one linear pass. Measured in CPU seconds of
    this process, so other load on the machine does not make it flaky; the old code took
    ~11 s CPU for this (benchmarks/plan_10k.py times the whole command)."""
    import time

    import yaml

    from mergebuild.spec import yaml_lines
    from mergebuild.spec.graph import build_graph, build_order, default_targets

    assert yaml_lines._Parser is yaml.CSafeLoader
    lines = ["version: 1", "models:", "  base: {source: ./base}", "  instruct: {source: ./i}"]
    for i in range(9998):
        parent = "instruct" if i == 0 else f"m{(i - 1) // 2}"
        lines += [f"  m{i}:", "    merge_method: linear", "    models:",
                  "      - {model: base, parameters: {weight: 0.5}}",
                  f"      - model: {parent}", "        parameters:", f"          weight: 0.{i % 9 + 1}"]
    started = time.process_time()
    mf = parse_mergefile("\n".join(lines) + "\n", tmp_path / "Mergefile")
    graph = build_graph(mf)
    order = build_order(graph, default_targets(graph))
    cpu = time.process_time() - started
    assert len(mf.nodes) == 10_000 and len(order) == 10_000
    assert order[:3] == ["base", "instruct", "m0"]
    assert mf.nodes["m9997"].line == 4 + 9997 * 7 + 2  # its body, below "  m9997:"
    assert cpu < 4.0, f"{cpu:.2f} s CPU"


# Runs `mergebuild plan` counting, through audit hooks, the directories it lists and the
# files it opens in the store; then says which heavy modules it imported.
_COUNTING_PLAN = """
import json, sys
store, out = sys.argv[1], sys.argv[2]
listed, opened = [], []
def count(event, args):
    if event in ("os.listdir", "os.scandir"):
        listed.append(str(args[0]))
    elif event == "open" and isinstance(args[0], str) and args[0].startswith(store):
        opened.append(args[0])
sys.addaudithook(count)
from mergebuild.cli import invoke
code = invoke(sys.argv[3:])
with open(out, "w") as f:
    json.dump({"code": code, "listed": listed, "opened": opened,
               "modules": [m for m in ("torch", "networkx") if m in sys.modules]}, f)
"""


def test_a_plan_reads_the_store_the_same_few_times_for_20_or_2000_nodes(tmp_path, demo_models):
    """The plan path at scale: one listing of the refs (new and old layout) whatever the
    number of nodes, the records that exist opened and no others, and neither torch nor
    networkx imported (benchmarks/plan_10k.py times the 10,000-node plan)."""
    import json
    import subprocess
    import sys

    from mergebuild.store.objects import Store

    models = demo_models["base"].parent
    seen = {}
    for nodes in (20, 2000):
        root = tmp_path / str(nodes)
        root.mkdir()
        lines = ["version: 1", "models:", f"  base: {{source: {models}/base}}",
                 f"  instruct: {{source: {models}/instruct}}"]
        for i in range(nodes - 2):
            parent = "instruct" if i == 0 else f"m{(i - 1) // 2}"
            lines += [f"  m{i}:", "    merge_method: linear", "    models:",
                      "      - {model: base, parameters: {weight: 0.5}}",
                      f"      - {{model: {parent}, parameters: {{weight: 0.5}}}}"]
        mergefile = root / "Mergefile"
        mergefile.write_text("\n".join(lines) + "\n")
        store = Store(root / "cache")
        for node in ("m0", "m1", "m7"):  # built once, under another recipe
            store.refs_of(mergefile.resolve()).write(node, {"key": "0" * 64, "digest": None})
        (store.refs / "m3.json").write_text(json.dumps({"key": "1" * 64}))  # the old layout
        out = root / "counts.json"
        argv = ["-f", str(mergefile), "--cache-dir", str(store.root), "plan"]
        result = subprocess.run([sys.executable, "-c", _COUNTING_PLAN, str(store.root), str(out),
                                 *argv], capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        counts = json.loads(out.read_text())
        assert counts["code"] == 0 and counts["modules"] == []
        assert result.stdout.splitlines()[-1] == f"{nodes - 2} to build"
        in_store = sorted(p for p in counts["listed"] if p.startswith(str(tmp_path)))
        assert in_store == sorted([str(store.refs), str(store.refs_of(mergefile.resolve()).dir)])
        refs = sorted(Path(p).name for p in counts["opened"] if p.startswith(str(store.refs)))
        assert refs == ["m0.json", "m1.json", "m3.json", "m7.json"]
        # m0 is the one node both of whose parents are sources: its key is looked up.
        others = [p for p in counts["opened"] if not p.startswith(str(store.refs))]
        assert [Path(p).relative_to(store.objects).parts[2] for p in others] == [
            "provenance.json"]
        seen[nodes] = len(counts["listed"])
    assert seen[20] == seen[2000]
