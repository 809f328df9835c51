"""`mergebuild export NODE DIR --format gguf`: a GGUF of the verified build, with provenance that
names the file's sha256 and the build's digest, checked by `verify`; demo and HF architectures."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import CHAIN
from test_io_gguf import ARCH_NAMES, PERMUTED, tiny_transformers_model

from mergebuild.cli import main
from mergebuild.io.checkpoint import CheckpointReader
from mergebuild.provenance.statement import read_statement, statement_digest

TWO_PARENTS = """\
version: 1
models:
  a: {{source: {a}}}
  b: {{source: {b}}}
  blend:
    merge_method: linear
    models: [{{model: a, parameters: {{weight: 0.5}}}}, {{model: b, parameters: {{weight: 0.5}}}}]
    dtype: float32
"""


def run(ws, *args):
    return CliRunner().invoke(main, ["-f", str(ws.mergefile), "--cache-dir", str(ws.cache),
                                     *args], obj={})


def build_tensors(build: Path) -> dict[str, torch.Tensor]:
    with CheckpointReader(build) as reader:
        return {n: reader.load(n).to(torch.float32).clone() for n in reader.tensors}


def read_back(path: Path) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    fields = {name: f.contents() for name, f in reader.fields.items()}
    return tensors, fields


@pytest.fixture
def chain(workspace):
    workspace.write(CHAIN)
    assert run(workspace, "make", "chat-code").exit_code == 0
    return workspace


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0"])
def test_gguf_export_of_a_demo_merge_reads_back_and_verifies(chain, tmp_path, quant):
    dest = tmp_path / "gguf"
    result = run(chain, "export", "chat-code", str(dest), "--format", "gguf", "--quant", quant)
    assert result.exit_code == 0, result.output
    assert result.output == f"chat-code: exported 3 files to {dest}\n"
    assert sorted(p.name for p in dest.iterdir()) == [  # the marker: an export wrote it
        ".mergebuild-export", "README.md", f"chat-code-{quant}.gguf", "provenance.json"]
    gguf_file = dest / f"chat-code-{quant}.gguf"
    build = chain.project().path("chat-code")
    source = build_tensors(build)
    tensors, fields = read_back(gguf_file)
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == "chat-code"
    assert "tokenizer.ggml.tokens" in fields and fields["tokenizer.ggml.model"] == "gpt2"
    assert len(tensors) == len(source)
    # Unpermuted tensors, value for value (F16/BF16 exact after conversion, Q within a block's
    # quantisation error; test_io_gguf bounds every tensor).
    embed = source["model.embed_tokens.weight"]
    got = tensors["token_embd.weight"]
    if quant == "f16":
        assert np.array_equal(got, embed.to(torch.float16).numpy())
    elif quant == "bf16":
        assert np.array_equal(gguf.quants.dequantize(got, gguf.GGMLQuantizationType.BF16)
                              .reshape(embed.shape), embed.numpy())
    norm = source["model.norm.weight"].numpy()
    assert np.array_equal(tensors["output_norm.weight"], norm)  # 1-D tensors stay F32

    statement = json.loads((dest / "provenance.json").read_text())
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    subjects = {s["name"]: s["digest"] for s in statement["subject"]}
    assert subjects[gguf_file.name] == {"sha256": digest}
    definition = statement["predicate"]["buildDefinition"]
    assert definition["buildType"] == "https://mergebuild.dev/buildtypes/gguf/v1"
    assert definition["internalParameters"]["digest"] == f"sha256:{digest}"
    (dep,) = definition["resolvedDependencies"]
    assert dep["name"] == "chat-code" and dep["annotations"]["role"] == "source"
    assert f"sha256:{dep['digest']['sha256']}" == statement_digest(read_statement(build))
    card = (dest / "README.md").read_text()
    assert digest in card and "tags:\n- gguf" in card

    verified = run(chain, "verify", str(dest))
    assert verified.exit_code == 0, verified.output
    assert verified.output == "verified 2 files, chain of 2 stages\n"
    shown = run(chain, "lineage", str(dest), "--json")
    assert json.loads(shown.output)["parents"][0]["name"] == "chat-code"


def test_verify_of_a_gguf_export_catches_a_changed_file_and_a_forged_source(chain, tmp_path):
    dest = tmp_path / "gguf"
    assert run(chain, "export", "chat-code", str(dest), "--format", "gguf").exit_code == 0
    gguf_file = dest / "chat-code-f16.gguf"
    data = bytearray(gguf_file.read_bytes())
    data[-1] ^= 1
    gguf_file.write_bytes(bytes(data))
    result = run(chain, "verify", str(dest))
    assert result.exit_code == 1
    assert result.output.startswith("chat-code-f16.gguf: modified: sha256 ")

    data[-1] ^= 1
    gguf_file.write_bytes(bytes(data))
    statement = json.loads((dest / "provenance.json").read_text())
    dep = statement["predicate"]["buildDefinition"]["resolvedDependencies"][0]
    dep["digest"]["sha256"] = "0" * 64  # claims another build than the one embedded
    (dest / "provenance.json").write_text(json.dumps(statement))
    result = run(chain, "verify", str(dest))
    assert result.exit_code == 1
    assert "embedded statement describes sha256:" in result.output
    assert "dependency names sha256:000000000000" in result.output


def test_gguf_export_keeps_the_export_guard(chain, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    result = run(chain, "export", "chat-code", str(dest), "--format", "gguf")
    assert result.exit_code == 1
    assert "is not empty" in result.output
    assert (dest / "notes.txt").read_text() == "mine"
    usage = run(chain, "export", "chat-code", str(tmp_path / "x"), "--quant", "q8_0")
    assert usage.exit_code == 2 and "--quant applies to --format gguf" in usage.output


def test_gguf_export_refuses_a_tampered_build(chain, tmp_path):
    build = chain.project().path("chat-code")
    weights = build / "model.safetensors"
    build.chmod(0o755)
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    result = run(chain, "export", "chat-code", str(tmp_path / "g"), "--format", "gguf")
    assert result.exit_code == 4
    assert "does not match its provenance" in result.output
    assert not (tmp_path / "g").exists()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, demo_models) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("gguf-archs")
    tokenizer = demo_models["base"]
    out = {}
    for model_type in ("mistral", "qwen2", "qwen3", "gemma", "gemma2"):
        first = tiny_transformers_model(root / f"{model_type}-a", model_type, tokenizer)
        second = root / f"{model_type}-b"
        shutil.copytree(first, second)
        with CheckpointReader(second) as reader:
            tensors = {n: reader.load(n).clone() * 1.5 for n in reader.tensors}
        from safetensors.torch import save_file

        for f in second.glob("*.safetensors"):
            f.unlink()
        save_file(tensors, second / "model.safetensors", metadata={"format": "pt"})
        out[model_type] = (first, second)
    return out


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3", "gemma", "gemma2"])
def test_gguf_export_of_a_merge_per_architecture(workspace, hf_models, tmp_path, model_type):
    a, b = hf_models[model_type]
    workspace.mergefile.write_text(TWO_PARENTS.format(a=a, b=b))
    assert run(workspace, "make", "blend").exit_code == 0
    dest = tmp_path / "out"
    result = run(workspace, "export", "blend", str(dest), "--format", "gguf", "--quant", "f16")
    assert result.exit_code == 0, result.output
    tensors, fields = read_back(dest / "blend-f16.gguf")
    assert fields["general.architecture"] == ARCH_NAMES[model_type]
    source = build_tensors(workspace.project().path("blend"))
    assert len(tensors) == len(source)
    down = source["model.layers.1.mlp.down_proj.weight"].to(torch.float16).numpy()
    assert np.array_equal(tensors["blk.1.ffn_down.weight"], down)
    v = source["model.layers.0.self_attn.v_proj.weight"].to(torch.float16).numpy()
    assert np.array_equal(tensors["blk.0.attn_v.weight"], v)
    if model_type not in PERMUTED:  # llama.cpp's qwen/gemma graphs take Q as written
        q = source["model.layers.0.self_attn.q_proj.weight"].to(torch.float16).numpy()
        assert np.array_equal(tensors["blk.0.attn_q.weight"], q)
    assert run(workspace, "verify", str(dest)).exit_code == 0


def test_an_architecture_gguf_cannot_hold_is_a_one_line_error(workspace, demo_models, tmp_path):
    odd = tmp_path / "mamba"
    shutil.copytree(demo_models["chat"], odd)
    config = json.loads((odd / "config.json").read_text())
    config |= {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}
    (odd / "config.json").write_text(json.dumps(config))
    workspace.mergefile.write_text(TWO_PARENTS.format(a=odd, b=odd))
    assert run(workspace, "make", "blend").exit_code == 0
    dest = tmp_path / "out"
    result = run(workspace, "export", "blend", str(dest), "--format", "gguf")
    assert result.exit_code == 3
    (line,) = result.output.splitlines()
    assert line.startswith("mergebuild: error: node 'blend': cannot convert MambaForCausalLM")
    assert not dest.exists()
