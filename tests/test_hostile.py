"""Hostile and careless input beyond the one-line table: deep chains, pattern keys, non-finite
weights allowed on request, what stdout carries, what a build reveals, rebuild excerpts and
make --check's verdict."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from cli_process import run_cli

from mergebuild.io.module_patterns import ModulePattern, PatternError
from mergebuild.provenance.integrity import chain_problems
from mergebuild.provenance.lineage import iter_lineage, lineage_from_statement
from mergebuild.provenance.secrets import scrub_text
from mergebuild.provenance.statement import (
    BuildRecord,
    ParentRef,
    build_statement,
    dumps_statement,
    read_statement,
)
from mergebuild.sources.demo import Delta, generate_model

TINY = {"hidden_size": 8, "num_layers": 1, "vocab_size": 32, "intermediate_size": 8,
        "num_heads": 1, "num_kv_heads": 1}


# --------------------------------------------------------------------------- deep chains


def _chain_mergefile(root: Path, depth: int) -> str:
    """a, b tiny sources; s1 = a + 0.001·b, s_i = s_(i-1) + 0.001·b in float32: every
    stage's bytes differ, so no early cutoff shortens the chain."""
    generate_model(root / "a", 0, **TINY)
    generate_model(root / "b", 0, deltas=[Delta(7)], **TINY)
    lines = ["version: 1", "models:", "  a: {source: ./a}", "  b: {source: ./b}"]
    previous = "a"
    for i in range(1, depth + 1):
        lines += [f"  s{i}:", "    merge_method: linear", "    parameters: {normalize: false}",
                  "    dtype: float32", "    models:",
                  f"      - {{model: {previous}, parameters: {{weight: 1.0}}}}",
                  "      - {model: b, parameters: {weight: 0.001}}"]
        previous = f"s{i}"
    return "\n".join(lines) + "\n"


def test_a_chain_deeper_than_python_recursion_builds_verifies_and_grows_linearly(tmp_path):
    """145 stages (the old limit was 139: RecursionError), built by the real CLI; each
    provenance.json embeds every upstream statement once, so its size is linear in depth."""
    depth = 145
    (tmp_path / "Mergefile").write_text(_chain_mergefile(tmp_path, depth))
    store = Path(os.environ.get("MERGEBUILD_TEST_TMPFS", "/dev/shm")) / f"mb-deep-{os.getpid()}"
    if not store.parent.is_dir():
        store = tmp_path / "cache"
    try:
        made = run_cli(["--cache-dir", str(store), "-q", "make", f"s{depth}"], cwd=tmp_path,
                       timeout=900)
        assert made.returncode == 0, made.stderr
        built = Path(made.stdout.strip().split(": ", 1)[1])
        verified = run_cli(["--cache-dir", str(store), "verify", f"s{depth}"], cwd=tmp_path)
        assert verified.returncode == 0, verified.stderr
        assert verified.stdout.strip().endswith(f"chain of {depth} stages")
        sizes = {}
        for i in (1, 36, 72, 108, 144):
            path = run_cli(["--cache-dir", str(store), "path", f"s{i}"], cwd=tmp_path)
            sizes[i] = (Path(path.stdout.strip()) / "provenance.json").stat().st_size
        steps = [(sizes[b] - sizes[a]) / (b - a) for a, b in zip(sizes, list(sizes)[1:])]
        assert max(steps) < 1.05 * min(steps), (sizes, steps)  # linear, not quadratic
        assert max(steps) < 8 * 1024  # one flat statement per stage
        statement = read_statement(built)
        embedded = statement["predicate"]["buildDefinition"]["internalParameters"][
            "upstreamStatements"]
        assert len(embedded) == depth - 1  # each upstream stage once
        lineage = run_cli(["--cache-dir", str(store), "lineage", "--json", f"s{depth}"],
                          cwd=tmp_path)
        assert lineage.returncode == 0, lineage.stderr
    finally:
        shutil.rmtree(store, ignore_errors=True)


def _record(node: str, digest: str, parents: tuple[ParentRef, ...]) -> BuildRecord:
    sha = digest.removeprefix("sha256:")
    return BuildRecord(
        node=node, key=sha, digest=digest, method="linear", recipe={"method": "linear"},
        spec={"merge_method": "linear", "models": [{"model": p.name} for p in parents]},
        mergefile_digest="sha256:" + "0" * 64, mergefile_excerpt="", parents=parents,
        outputs={"model.safetensors": (sha, 1000)}, builder={"mergebuild": "test"},
        device="cpu", engine_version="1", started="2026-01-01T00:00:00.000Z",
        finished="2026-01-01T00:00:01.000Z", invocation_id="0" * 16,
        rebuild_command=f"mergebuild make {node}")


def test_500_deep_statement_chain_is_linear_and_checks_without_recursion():
    """The statements of a 500-stage chain, each built on the one before as make does: the
    last one embeds 499 flat statements, checks clean and reads back as a 500-stage lineage,
    all without recursion; its size grows by a constant per stage."""
    import hashlib

    source = ParentRef(name="b", role="model", kind="local", uri="./b",
                       digest="xxh128:" + "1" * 32)
    statement = None
    sizes = []
    for i in range(1, 501):
        parents = (source,)
        if statement is not None:
            previous = statement["predicate"]["buildDefinition"]["internalParameters"]["digest"]
            parents = (ParentRef(name=f"s{i - 1}", role="model", kind="node",
                                 uri=f"mergebuild:node/s{i - 1}", digest=previous,
                                 statement=statement, method="linear"), source)
        digest = "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()
        statement = build_statement(_record(f"s{i}", digest, parents))
        sizes.append(len(dumps_statement(statement)))
    assert chain_problems(statement) == []
    stages = [n for n in iter_lineage(lineage_from_statement(statement)) if n.is_build]
    assert len(stages) == 500
    steps = {sizes[i] - sizes[i - 1] for i in range(100, 500)}
    assert max(steps) - min(steps) <= 8, steps  # the same bytes per stage (digits aside)
    assert sizes[-1] < 500 * 4096


# --------------------------------------------------------------------------- LoRA pattern keys


@pytest.mark.parametrize("key", [
    "q_proj", "self_attn.q_proj", "layers.0.self_attn.q_proj", r"layers\.\d+\.mlp\..*",
    "experts.*.w1", "(q|k)_proj", "layers.1[0-9]?.mlp.down_proj", "[^.]+_proj", "^lm_head",
    "proj", "q_proj$", r"layers.[0-9]{1,2}.self_attn.(q|k|v)_proj", "", "a*"])
def test_pattern_keys_match_exactly_as_peft_does(key):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.down_proj", "lm_head",
             "model.layers.1.self_attn.k_proj", "model.layers.0.block_sparse_moe.experts.3.w1",
             "q_proj", "x.", ""]
    pattern = ModulePattern(key)
    for name in names:  # PEFT: re.match(rf"(.*\.)?({key})$", name)
        assert pattern.matches(name) == bool(re.match(rf"(.*\.)?({key})$", name)), name


def test_a_catastrophic_pattern_key_matches_in_linear_time():
    started = time.monotonic()
    assert not ModulePattern("(a+)+b").matches("a" * 20_000)
    assert not ModulePattern("(.*)*.*.*.*x").matches("a." * 5_000)
    assert time.monotonic() - started < 5  # re.match takes hours on these


@pytest.mark.parametrize(("key", "why"), [
    ("(q_proj", "is not a regular expression"), (r"(a)\1", "needs backtracking"),
    ("(?=q)q_proj", "needs backtracking"), ("(?i)Q_PROJ", "sets flags"),
    ("a" * 600, "limit 512"), ("((a{50}){50}){50}", "too complex")])
def test_pattern_keys_an_nfa_cannot_run_are_refused_in_one_line(key, why):
    with pytest.raises(PatternError, match=re.escape(why)) as caught:
        ModulePattern(key)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------- non-finite weights


NAN_MERGEFILE = """\
version: 1
models:
  base: {{source: {models}/base}}
  instruct: {{source: {models}/instruct}}
  src: {{source: ./poisoned}}
  stock:
    merge_method: model_stock
    base_model: base
{extra}    models: [{{model: instruct}}, {{model: src}}]
"""


def _poisoned(models: Path, target: Path) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(models / "base", target)
    tensors = load_file(str(target / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"].view(-1)[7] = float("nan")
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("how", ["flag", "node"])
def test_allow_nonfinite_merges_a_nan_parent_when_asked(tmp_path, demo_models, how):
    _poisoned(demo_models["base"].parent, tmp_path / "poisoned")
    extra = "    allow_nonfinite: true\n" if how == "node" else ""
    (tmp_path / "Mergefile").write_text(
        NAN_MERGEFILE.format(models=demo_models["base"].parent, extra=extra))
    refused = run_cli(["make", "stock"], cwd=tmp_path) if how == "flag" else None
    if refused is not None:
        assert refused.returncode == 3
        assert "parent 'src' holds NaN or Inf" in refused.error_lines[0]
    argv = ["make", "--allow-nonfinite", "stock"] if how == "flag" else ["make", "stock"]
    made = run_cli(argv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    from safetensors.torch import load_file

    built = Path(made.stdout.strip().split(": ", 1)[1])
    merged = load_file(str(built / "model.safetensors"))
    assert merged["model.layers.1.mlp.down_proj.weight"].isnan().any()  # as asked


# --------------------------------------------------------------------------- output and leaks


SIMPLE = """\
version: 1
defaults:
  dtype: float32
models:
  base: {{source: {base}}}
  instruct: {{source: ./models/instruct}}
  avg:
    merge_method: linear
    description: the average
    models:
      - {{model: base, parameters: {{weight: 0.5}}}}
      - {{model: instruct, parameters: {{weight: 0.5}}}}
"""


@pytest.fixture
def project(tmp_path, demo_models, monkeypatch) -> Path:
    """A project whose sources are one inside it (./models) and one under $HOME."""
    home = tmp_path / "home"
    shutil.copytree(demo_models["base"], home / "models" / "base")
    root = home / "work" / "proj"
    shutil.copytree(demo_models["instruct"], root / "models" / "instruct")
    (root / "Mergefile").write_text(SIMPLE.format(base=home / "models" / "base"))
    monkeypatch.setenv("HOME", str(home))
    return root


def test_stdout_carries_only_results_also_quiet(project):
    for argv in (["make", "avg"], ["-q", "make", "avg"], ["make", "-q", "avg"]):
        made = run_cli(argv, cwd=project, env={"HOME": os.environ["HOME"]})
        assert made.returncode == 0, made.stderr
        assert re.fullmatch(r"avg: /\S+\n", made.stdout), made.stdout
        path = made.stdout.strip().split(": ", 1)[1]
        assert (Path(path) / "model.safetensors").is_file()
    loud = run_cli(["make", "-B", "avg"], cwd=project, env={"HOME": os.environ["HOME"]})
    assert "building avg" in loud.stderr and "building" not in loud.stdout


def test_a_build_records_no_absolute_local_path(project):
    made = run_cli(["make", "avg"], cwd=project, env={"HOME": os.environ["HOME"]})
    assert made.returncode == 0, made.stderr
    built = Path(made.stdout.strip().split(": ", 1)[1])
    for name in ("provenance.json", "README.md"):
        text = (built / name).read_text()
        assert os.environ["HOME"] not in text, name
        assert str(project) not in text, name
    deps = read_statement(built)["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert {d["name"]: d["uri"] for d in deps} == {"base": "~/models/base",
                                                  "instruct": "./models/instruct"}


@pytest.mark.parametrize("text", [
    "hf://user:hunter2@org/x", "https://user:hunter2@huggingface.co/org/x",
    "hf://org/x@hf_abcdefghijklmnopqrstuvwxyz0123456789"])
def test_the_scrubber_removes_credentials_from_urls_and_revisions(text):
    scrubbed = scrub_text(f"invalid hub reference '{text}'")
    assert "hunter2" not in scrubbed and "hf_abcdefghij" not in scrubbed
    assert "[REDACTED]" in scrubbed
    assert scrub_text("hf://gpt2@main") == "hf://gpt2@main"  # a revision is not a secret


def test_credentials_are_not_echoed_by_plan(tmp_path):
    (tmp_path / "Mergefile").write_text(
        "version: 1\nmodels:\n  a: {source: 'hf://org/x@hf_abcdefghijklmnopqrstuvwxyz0123'}\n"
        "  m:\n    merge_method: linear\n    models: [{model: a, parameters: {weight: 1}}]\n")
    planned = run_cli(["plan"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in planned.stdout + planned.stderr


# --------------------------------------------------------------------------- rebuild excerpt


def test_following_the_cards_excerpt_in_a_fresh_directory_reproduces_the_digest(tmp_path):
    text = ("version: 1\ndefaults:\n  dtype: float32\nmodels:\n"
            "  base: {source: 'demo://base'}\n  instruct: {source: 'demo://instruct'}\n"
            "  avg:\n    merge_method: linear\n    models:\n"
            "      - {model: base, parameters: {weight: 0.3}}\n"
            "      - {model: instruct, parameters: {weight: 0.7}}\n")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "Mergefile").write_text(text)
    made = run_cli(["-q", "make", "avg"], cwd=first)
    assert made.returncode == 0, made.stderr
    built = Path(made.stdout.strip().split(": ", 1)[1])
    card = (built / "README.md").read_text()
    excerpt = re.search(r"excerpt holds this node.*?```yaml\n(.*?)```", card, re.DOTALL).group(1)
    assert yaml.safe_load(excerpt)["defaults"] == {"dtype": "float32"}
    (second / "Mergefile").write_text(excerpt)
    again = run_cli(["-q", "make", "avg"], cwd=second)
    assert again.returncode == 0, again.stderr
    rebuilt = Path(again.stdout.strip().split(": ", 1)[1])
    digest = read_statement(built)["predicate"]["buildDefinition"]["internalParameters"]["digest"]
    assert read_statement(rebuilt)["predicate"]["buildDefinition"]["internalParameters"][
        "digest"] == digest


# --------------------------------------------------------------------------- make --check


@pytest.mark.parametrize("edit", ["rename", "describe"])
def test_check_after_a_rename_or_a_new_description_is_reproduced(project, edit):
    env = {"HOME": os.environ["HOME"]}
    assert run_cli(["make", "avg"], cwd=project, env=env).returncode == 0
    mergefile = project / "Mergefile"
    text = mergefile.read_text()
    node = "avg"
    if edit == "rename":
        text, node = text.replace("  avg:", "  mean:"), "mean"
    else:
        text = text.replace("the average", "the mean of base and instruct")
    mergefile.write_text(text)
    checked = run_cli(["make", "--check", node], cwd=project, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = checked.stdout.splitlines()
    assert lines[0].startswith(f"{node}: reproduced bit for bit (")
    assert lines[1] == (f"{node}: the model card differs (the node's name or description "
                        "changed; the model did not)")


def test_check_says_whether_weights_or_metadata_differ(project):
    env = {"HOME": os.environ["HOME"]}
    made = run_cli(["make", "avg"], cwd=project, env=env)
    built = Path(made.stdout.strip().split(": ", 1)[1])
    config = built / "config.json"
    os.chmod(built, 0o755)
    os.chmod(config, 0o644)
    text = config.read_text()
    assert '"llama"' in text
    config.write_text(text.replace('"llama"', '"llamb"', 1))  # same size: a quiet edit
    checked = run_cli(["make", "--check", "avg"], cwd=project, env=env)
    assert checked.returncode == 1
    lines = checked.stdout.splitlines()
    assert "avg: weights reproduced bit for bit" in lines
    assert "avg: metadata differs (config.json)" in lines
    assert lines[-1].startswith("avg: NOT reproduced (1 of ")


def test_verify_and_lineage_of_a_provenance_nested_1000_deep_is_one_line(tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "provenance.json").write_text("[" * 1000 + "]" * 1000)
    for verb in ("verify", "lineage"):
        run = run_cli([verb, str(directory)], cwd=tmp_path)
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
        assert any("nested more than" in line for line in lines), lines


@pytest.mark.parametrize("ref", ['["a list"]', '{"key": 7}', "[" * 1000 + "]" * 1000, "not json"])
def test_refs_of_the_wrong_shape_are_rewritten_not_crashed_on(project, ref):
    env = {"HOME": os.environ["HOME"]}
    made = run_cli(["make", "avg"], cwd=project, env=env)
    assert made.returncode == 0, made.stderr
    ref_file = next(p for p in (project / "cache" / "refs").rglob("avg.json"))
    ref_file.write_text(ref)
    for argv in (["plan"], ["path", "avg"], ["gc", "-n"], ["make", "avg"]):
        run = run_cli(argv, cwd=project, env=env)
        assert run.returncode == 0 and "Traceback" not in run.stderr, (argv, run.stderr)
    assert json.loads(ref_file.read_text())["key"]  # make recorded the build again

