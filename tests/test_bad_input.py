"""Bad input, table-driven: each case runs the real CLI and must fail with one clear line.

Every case asserts: a non-zero exit; stderr is exactly one line starting ``mergebuild: error:``
that contains the case's expected fragments (file:line and/or node, and a hint); the store is
untouched (objects, refs and tmp/ compare equal before and after; the stat cache and lock
files are bookkeeping and are not compared). RELIABILITY.md lists every case id
(tests/gen_reliability.py regenerates it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cli_process import run_cli

OK_NODE = """\
  base: {source: {models}/base}
  instruct: {source: {models}/instruct}
  ok:
    merge_method: linear
    models:
      - {model: base, parameters: {weight: 0.5}}
      - {model: instruct, parameters: {weight: 0.5}}
"""


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, for RELIABILITY.md
    mergefile: str  # {models} is the demo models' directory, {bad} this case's scratch dir
    expect: tuple[str, ...]  # fragments the error line must contain
    target: str = "bad"
    exit_code: int | None = None
    setup: Callable[[Path, Path], None] | None = field(default=None, repr=False)
    argv: tuple[str, ...] = ("make",)


def _head(body: str) -> str:
    return "version: 1\nmodels:\n" + OK_NODE + body


def _merge(method: str, extra: str = "", models: str = "", base: str | None = None) -> str:
    text = f"  bad:\n    merge_method: {method}\n"
    if base:
        text += f"    base_model: {base}\n"
    text += extra
    if models:
        text += "    models:\n" + models
    return _head(text)


def _entries(*pairs: tuple[str, str]) -> str:
    return "".join(f"      - {{model: {m}, parameters: {{{p}}}}}\n" for m, p in pairs)


TWO = _entries(("base", "weight: 0.5"), ("instruct", "weight: 0.5"))


def _source(line: str) -> str:
    return _head(f"  src: {{source: {line}}}\n  bad:\n    merge_method: linear\n    models:\n"
                 + _entries(("base", "weight: 0.5"), ("src", "weight: 0.5")))


# --- scratch sources -------------------------------------------------------------------------


def _copy_base(models: Path, bad: Path) -> Path:
    target = bad / "model"
    shutil.copytree(models / "base", target)
    return target / "model.safetensors"


def _no_weights(models: Path, bad: Path) -> None:
    (bad / "model").mkdir()
    shutil.copy(models / "base" / "config.json", bad / "model" / "config.json")


def _pickle_only(models: Path, bad: Path) -> None:
    _no_weights(models, bad)
    (bad / "model" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def _truncated(models: Path, bad: Path) -> None:
    weights = _copy_base(models, bad)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _header_too_long(models: Path, bad: Path) -> None:
    weights = _copy_base(models, bad)
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])


def _header_cap(models: Path, bad: Path) -> None:
    weights = _copy_base(models, bad)
    weights.write_bytes(struct.pack("<Q", 2**40) + b"{}" + b"\0" * 64)


def _offsets_beyond(models: Path, bad: Path) -> None:
    weights = _copy_base(models, bad)
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**9
    raw = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _not_json_header(models: Path, bad: Path) -> None:
    weights = _copy_base(models, bad)
    data = weights.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[:8] + b"[" + b"x" * (n - 1) + data[8 + n :])


def _missing_shard(models: Path, bad: Path) -> None:
    _copy_base(models, bad)
    (bad / "model" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))


def _bad_config(models: Path, bad: Path) -> None:
    _copy_base(models, bad)
    (bad / "model" / "config.json").write_text("{not json")


def _generated(**shape) -> Callable[[Path, Path], None]:
    def setup(models: Path, bad: Path) -> None:
        from mergebuild.sources.demo import generate_model

        generate_model(bad / "model", 0, **shape)

    return setup


def _lora(models: Path, bad: Path) -> None:
    """A real PEFT LoRA adapter trained for a model with hidden size 32 (ours has 64)."""
    import torch
    from safetensors.torch import save_file

    (bad / "lora").mkdir()
    (bad / "lora" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "someone/other-base", "r": 4,
         "lora_alpha": 8, "target_modules": ["q_proj"]}))
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{module}.lora_A.weight": torch.zeros(4, 32),
               f"{module}.lora_B.weight": torch.zeros(32, 4)},
              str(bad / "lora" / "adapter_model.safetensors"))


# --- the table -------------------------------------------------------------------------------

CASES = [
    Case("yaml-syntax", "YAML syntax error", "version: 1\nmodels:\n  a: {source: [\n",
         ("Mergefile:", "YAML syntax error", "(fix the YAML syntax)"), exit_code=2),
    Case("empty-file", "empty Mergefile", "",
         ("Mergefile: the Mergefile is empty", "add 'version: 1'"), exit_code=2),
    Case("not-a-mapping", "a YAML list instead of a mapping", "- a\n- b\n",
         ("Mergefile:1:", "must be a mapping"), exit_code=2),
    Case("bad-version", "unsupported version", "version: 2\nmodels:\n" + OK_NODE,
         ("Mergefile:1:", "unsupported Mergefile version 2", "reads version 1"), exit_code=2),
    Case("unknown-top-key", "unknown top-level key (did-you-mean)",
         "version: 1\nmodles:\n  a: {source: ./a}\n",
         ("Mergefile:2:", "unknown key 'modles'", "did you mean 'models'?"), exit_code=2),
    Case("unknown-node-key", "unknown key in a merge node (did-you-mean)",
         _merge("linear", "    paramters: {normalize: true}\n", TWO),
         ("Mergefile:12:", "node 'bad'", "unknown key 'paramters'",
          "did you mean 'parameters'?"), exit_code=2),
    Case("node-key-typo", "node with neither source nor merge_method (typo)",
         _head("  bad:\n    merge_metod: linear\n"),
         ("Mergefile:10:", "node 'bad'", "neither 'source' nor 'merge_method'",
          "did you mean 'merge_method'?"), exit_code=2),
    Case("unknown-method", "unknown merge method (did-you-mean)", _merge("linaer", "", TWO),
         ("Mergefile:11:", "node 'bad'", "unknown merge method 'linaer'",
          "did you mean 'linear'?"), exit_code=2),
    Case("unknown-parameter", "unknown parameter (did-you-mean)",
         _merge("linear", "", _entries(("base", "wieght: 0.5"), ("instruct", "weight: 0.5"))),
         ("Mergefile:13:", "node 'bad'", "unknown parameter 'wieght'",
          "did you mean 'weight'?"), exit_code=2),
    Case("missing-base", "method that needs a base_model without one",
         _merge("task_arithmetic", "", TWO),
         ("Mergefile:11:", "node 'bad'", "task_arithmetic needs a base_model",
          "add 'base_model: NODE'"), exit_code=2),
    Case("slerp-three-parents", "SLERP with three parents",
         _merge("slerp", "    parameters: {t: 0.5}\n",
                "      - {model: instruct}\n      - {model: ok}\n      - {model: base}\n",
                base="base"),
         ("node 'bad'", "slerp takes exactly 1 model besides the base_model, got 2",
          "check 'models:'"), exit_code=2),
    Case("density-negative", "density < 0",
         _merge("ties", "", _entries(("instruct", "weight: 0.5, density: -0.1")), base="base"),
         ("Mergefile:14:", "node 'bad'", "parameter 'density' must be >= 0"), exit_code=2),
    Case("density-above-one", "density > 1",
         _merge("ties", "", _entries(("instruct", "weight: 0.5, density: 1.5")), base="base"),
         ("Mergefile:14:", "node 'bad'", "parameter 'density' must be <= 1"), exit_code=2),
    Case("weight-not-a-number", "non-numeric weight",
         _merge("linear", "", _entries(("base", "weight: heavy"), ("instruct", "weight: 1"))),
         ("Mergefile:13:", "node 'bad'", "parameter 'weight' must be a number, got 'heavy'"),
         exit_code=2),
    Case("weight-nan", "NaN weight",
         _merge("linear", "", _entries(("base", "weight: .nan"), ("instruct", "weight: 1"))),
         ("Mergefile:13:", "node 'bad'", "parameter 'weight' must not be NaN"), exit_code=2),
    Case("gradient-not-allowed", "gradient list on a parameter that takes none (bool)",
         _merge("linear", "    parameters: {normalize: [true, false]}\n", TWO),
         ("Mergefile:12:", "node 'bad'", "'normalize' is a bool and takes no gradient",
          "{filter: SUBSTRING, value: VALUE}"), exit_code=2),
    Case("gradient-nested", "gradient with nested lists",
         _merge("linear", "", _entries(("base", "weight: [[0.1, 0.2], 0.3]"),
                                       ("instruct", "weight: 1"))),
         ("Mergefile:13:", "node 'bad'", "gradients are flat lists of numbers"), exit_code=2),
    Case("node-wide-in-entry", "node-wide parameter given per model",
         _merge("slerp", "", _entries(("instruct", "t: 0.5")), base="base"),
         ("node 'bad'", "'t' is a node-wide parameter of slerp",
          "move it to the node's 'parameters:'"), exit_code=2),
    Case("undefined-reference", "reference to an undefined node (did-you-mean)",
         _merge("linear", "", _entries(("base", "weight: 1"), ("instrcut", "weight: 1"))),
         ("Mergefile:14:", "node 'bad'", "unknown model 'instrcut'", "did you mean 'instruct'?"),
         exit_code=2),
    Case("self-reference", "a node that is its own parent",
         _merge("linear", "", _entries(("base", "weight: 1"), ("bad", "weight: 1"))),
         ("Mergefile:11:", "node 'bad'", "uses itself as a parent"), exit_code=2),
    Case("cycle-of-three", "a cycle of three nodes",
         _head("".join(f"  {a}:\n    merge_method: linear\n    models:\n"
                       + _entries(("base", "weight: 1"), (b, "weight: 1"))
                       for a, b in (("x", "y"), ("y", "bad"), ("bad", "x")))),
         ("cycle:", "x", "y", "bad", "cannot depend on its own descendants"), exit_code=2),
    Case("duplicate-node", "the same node name twice",
         _head("  ok:\n    merge_method: linear\n    models:\n" + TWO),
         ("Mergefile:10:", "duplicate key 'ok' (first at line 5)", "may appear once"),
         exit_code=2),
    Case("node-name-slash", "a node name that is a path (slashes)",
         _head("  ../../etc/evil:\n    merge_method: linear\n    models:\n" + TWO),
         ("Mergefile:10:", "invalid node name '../../etc/evil'", "no slashes or '..'"),
         exit_code=2),
    Case("node-name-dotdot", "a node name containing '..'",
         _head("  a..b:\n    merge_method: linear\n    models:\n" + TWO),
         ("Mergefile:10:", "invalid node name 'a..b'"), exit_code=2),
    Case("target-not-in-file", "make a target that is not in the Mergefile",
         _head(""), ("Mergefile: no node named 'nope'", "nodes: base, instruct, ok"), target="nope", exit_code=2),
    Case("no-mergefile", "-f naming a file that does not exist", "",
         ("missing.yaml: no such Mergefile", "pass -f FILE"),
         argv=("-f", "missing.yaml", "make"), exit_code=2),
    Case("unsupported-dtype", "dtype that is not supported",
         _merge("linear", "    dtype: int8\n", TWO),
         ("Mergefile:12:", "node 'bad'", "unsupported dtype 'int8'",
          "float32, float16 or bfloat16"), exit_code=2),
    Case("models-and-slices", "both models and slices",
         _merge("passthrough", "    slices:\n      - sources: [{model: base, layer_range: [0, 2]}]\n",
                "      - {model: base}\n"),
         ("node 'bad'", "either 'models' or 'slices'"), exit_code=2),
    Case("layer-range-malformed", "layer_range with end before start",
         _merge("passthrough",
                "    slices:\n      - sources: [{model: base, layer_range: [3, 1]}]\n"),
         ("Mergefile:13:", "node 'bad'", "layer_range must be [start, end)"), exit_code=2),
    Case("layer-range-out-of-range", "layer_range beyond the parent's layers",
         _merge("passthrough",
                "    slices:\n      - sources: [{model: base, layer_range: [0, 10]}]\n"),
         ("node 'bad'", "layer_range", "out of range", "4 layers"), exit_code=3),
    Case("unsupported-scheme", "source with an unsupported URL scheme",
         _source("s3://bucket/model"),
         ("Mergefile:10:", "node 'src'", "unsupported source 's3://bucket/model'"),
         exit_code=2),
    Case("demo-adapter-as-model", "a demo LoRA adapter used as a model",
         _source("demo://style-lora"),
         ("node 'src'", "demo://style-lora is a LoRA adapter, not a model",
          "base+demo://style-lora"), exit_code=3),
    Case("source-missing", "source directory that does not exist", _source("{bad}/nowhere"),
         ("node 'src'", "nowhere does not exist", "fix the path"), exit_code=3),
    Case("no-weights", "source directory without weights", _source("{bad}/model"),
         ("node 'src'", "no weights", "model directory"), setup=_no_weights, exit_code=3),
    Case("pickle-only", "source with only pickle (.bin) weights", _source("{bad}/model"),
         ("node 'src'", "pickle", "safetensors"), setup=_pickle_only, exit_code=3),
    Case("pickle-opt-in", "pickle-only source with allow_pickle: true",
         _head("  src: {source: {bad}/model, allow_pickle: true}\n  bad:\n"
               "    merge_method: linear\n    models:\n"
               + _entries(("base", "weight: 0.5"), ("src", "weight: 0.5"))),
         ("node 'src'", "pickle", "safetensors"), setup=_pickle_only, exit_code=3),
    Case("truncated-safetensors", "truncated safetensors file", _source("{bad}/model"),
         ("node 'src'", "model.safetensors", "truncated"), setup=_truncated, exit_code=3),
    Case("header-beyond-file", "header length larger than the file", _source("{bad}/model"),
         ("node 'src'", "model.safetensors is truncated: header length"),
         setup=_header_too_long, exit_code=3),
    Case("header-length-cap", "header length above the 100 MB cap", _source("{bad}/model"),
         ("node 'src'", "-byte header (limit 104857600)"), setup=_header_cap, exit_code=3),
    Case("offsets-beyond-file", "tensor data_offsets past the end of the file",
         _source("{bad}/model"), ("node 'src'", "model.safetensors"), setup=_offsets_beyond,
         exit_code=3),
    Case("header-not-json", "safetensors header that is not JSON", _source("{bad}/model"),
         ("node 'src'", "model.safetensors has a header that is not"), setup=_not_json_header,
         exit_code=3),
    Case("index-missing-shard", "index naming a shard that is absent", _source("{bad}/model"),
         ("node 'src'", "missing shard"), setup=_missing_shard, exit_code=3),
    Case("config-not-json", "config.json that is not JSON", _source("{bad}/model"),
         ("node 'src'", "config.json", "not valid JSON"), setup=_bad_config, exit_code=3),
    Case("shape-mismatch", "parents with different hidden sizes", _source("{bad}/model"),
         ("node 'bad'", "shape", "src"), setup=_generated(hidden_size=32), exit_code=3),
    Case("vocab-mismatch", "parents with different vocabularies", _source("{bad}/model"),
         ("node 'bad'", "vocab", "256", "300"), setup=_generated(vocab_size=300), exit_code=3),
    Case("layer-count-mismatch", "parents with different layer counts", _source("{bad}/model"),
         ("node 'bad'", "layers"), setup=_generated(num_layers=2), exit_code=3),
    Case("lora-base-mismatch", "LoRA adapter whose base does not match",
         _merge("linear", "", _entries(("base+{bad}/lora", "weight: 0.5"),
                                       ("instruct", "weight: 0.5"))),
         ("node 'bad'", "LoRA lora does not fit model.layers.0.self_attn.q_proj.weight",
          "use the adapter with the base model it was trained on"), setup=_lora, exit_code=3),
    Case("lora-stacked", "two LoRA adapters stacked on one reference",
         _merge("linear", "", _entries(("base+{bad}/lora+{bad}/lora", "weight: 0.5"),
                                       ("instruct", "weight: 0.5"))),
         ("Mergefile:13:", "node 'bad'", "stacks two adapters", "into a node of its own"),
         setup=_lora),
]


# --- export destinations (--force replaces only an earlier export or an empty directory) ----


def _project_dir(models: Path, bad: Path) -> None:
    (bad / "proj").mkdir()
    (bad / "proj" / "Mergefile").write_text("version: 1\nmodels: {}\n")


def _foreign_dir(models: Path, bad: Path) -> None:
    (bad / "foreign").mkdir()
    (bad / "foreign" / "notes.txt").write_text("not an export")


_FORCE = ("export", "ok", "--force")
EXPORT_CASES = [
    Case("export-force-store", "`export ok cache --force`: the store itself", _head(""),
         ("refusing to export", "it is the store", "pick a new or empty directory"),
         target="store", argv=_FORCE, exit_code=1),
    Case("export-force-in-store", "`export ok cache/objects --force`: inside the store",
         _head(""), ("refusing to export", "inside the store"), target="store/objects",
         argv=_FORCE, exit_code=1),
    Case("export-onto-object", "`export ok cache/objects/ab/new`: a new directory in the store",
         _head(""), ("refusing to export", "inside the store"), target="store/objects/ab/new",
         argv=("export", "ok"), exit_code=1),
    Case("export-force-cwd", "`export ok . --force` in the project (store, Mergefile, sources)",
         _head(""), ("refusing to export", "holds the store"), target=".", argv=_FORCE,
         exit_code=1),
    Case("export-force-parent", "`export ok .. --force`: above the current directory",
         _head(""), ("refusing to export", "holds"), target="..", argv=_FORCE, exit_code=1),
    Case("export-force-mergefile-dir", "`export --force` onto another project's directory",
         _head(""), ("refusing to export", "holds a Mergefile"), target="bad/proj",
         argv=_FORCE, setup=_project_dir, exit_code=1),
    Case("export-force-source", "`export --force` onto a local source's directory",
         _source("{bad}/model"), ("refusing to export", "the source of 'src'"),
         target="bad/model", argv=_FORCE, setup=_copy_base, exit_code=1),
    Case("export-force-foreign", "`export --force` onto a non-empty directory no export wrote",
         _head(""), ("refusing to export", "no export wrote it", ".mergebuild-export"),
         target="bad/foreign", argv=_FORCE, setup=_foreign_dir, exit_code=1),
]
CASES += EXPORT_CASES


# --- running ---------------------------------------------------------------------------------


def _fill(text: str, models: Path, bad: Path) -> str:
    return text.replace("{models}", str(models)).replace("{bad}", str(bad))


def _listing(store: Path) -> dict[str, str]:
    """What a failed make must not change: objects, refs and tmp/ (names and contents)."""
    out: dict[str, str] = {}
    for part in ("objects", "refs", "tmp"):
        root = store / part
        if not root.exists():
            continue
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(store).as_posix()
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file()
                        else "dir")
    return out


def _project_files(root: Path) -> list[Path]:
    """Every path of a case's project outside the store (compared by _listing) and the
    runner's logs."""
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.relative_to(root).parts[0] not in ("store", ".cli-logs"))


@pytest.fixture(scope="module")
def template_store(tmp_path_factory, demo_models) -> Path:
    """A store that already holds one build, so 'untouched' means something."""
    root = tmp_path_factory.mktemp("template")
    (root / "Mergefile").write_text(_fill(_head(""), demo_models["base"].parent, root))
    run = run_cli(["--cache-dir", "store", "make", "ok"], cwd=root)
    assert run.returncode == 0, run.stderr
    return root / "store"


def test_table_has_enough_distinct_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_clear_line(case: Case, tmp_path, demo_models,
                                             template_store):
    models = demo_models["base"].parent
    bad = tmp_path / "bad"
    bad.mkdir()
    if case.setup:
        case.setup(models, bad)
    (tmp_path / "Mergefile").write_text(_fill(case.mergefile, models, bad))
    store = tmp_path / "store"
    shutil.copytree(template_store, store)
    before = _listing(store)
    assert before, "the template store holds a build"
    files_before = _project_files(tmp_path)

    argv = ["--cache-dir", str(store), *case.argv, case.target]
    run = run_cli(argv, cwd=tmp_path)

    assert run.returncode != 0 and run.returncode > 0, (run.returncode, run.stderr)
    if case.exit_code is not None:
        assert run.returncode == case.exit_code, run.stderr
    lines = run.error_lines
    assert len(lines) == 1, run.stderr
    line = lines[0]
    assert line.startswith("mergebuild: error: "), line
    assert "Traceback" not in run.stderr
    for fragment in case.expect:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in {line!r}"
    assert _listing(store) == before
    assert not any((store / "tmp").iterdir()) if (store / "tmp").exists() else True
    if case.argv[0] == "export":  # nothing removed or added anywhere in the project
        assert _project_files(tmp_path) == files_before


def test_python_m_and_forked_runner_agree(tmp_path, demo_models, template_store):
    """The fast runner is the real CLI: `python -m mergebuild.cli` prints the same line."""
    from cli_process import run_python_m

    case = next(c for c in CASES if c.id == "unknown-method")
    (tmp_path / "Mergefile").write_text(
        _fill(case.mergefile, demo_models["base"].parent, tmp_path))
    store = tmp_path / "store"
    argv = ["--cache-dir", str(store), "make", "bad"]
    real, forked = run_python_m(argv, cwd=tmp_path), run_cli(argv, cwd=tmp_path)
    assert (real.returncode, real.stderr) == (forked.returncode, forked.stderr)
    assert not store.exists()
