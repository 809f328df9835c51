"""Do llama.cpp and transformers agree on a model exported by `mergebuild.io.gguf`?

Usage: ``python benchmarks/llama_cpp_check.py [WORKDIR]`` (needs ``llama-cpp-python`` and
``transformers``; build the former with ``CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install
llama-cpp-python``). It writes the demo model (llama layout, float32) and tiny mistral and
qwen3 models with transformers (reusing the demo tokenizer), exports each at every quant, and
for one prompt compares llama.cpp's token ids with the Hugging Face tokenizer's, its logits at
every position with transformers' logits, and four greedily generated tokens.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from mergebuild.io.gguf import export_gguf
from mergebuild.sources.demo import generate_model

PROMPT = "The instruct model learns to follow instructions. def merge(models, weights):"
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
NEW_TOKENS = 4


def tiny_model(directory: Path, model_type: str, tokenizer_dir: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        initializer_range=0.1,  # larger weights than 0.02 so the logits are far from zero
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def transformers_reference(model_dir: Path) -> tuple[list[int], np.ndarray, list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        generated = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
            pad_token_id=2, eos_token_id=None,
        )[0, len(ids):].tolist()
    return ids, logits, generated


def llama_cpp_run(
    gguf_path: Path, ids: list[int], kv_cache: str
) -> tuple[list[int], np.ndarray, list[int]]:
    from llama_cpp import GGML_TYPE_F16, GGML_TYPE_F32, Llama

    kv_type = {"f16": GGML_TYPE_F16, "f32": GGML_TYPE_F32}[kv_cache]
    llm = Llama(model_path=str(gguf_path), logits_all=True, n_ctx=256, n_threads=2,
                verbose=False, seed=0, type_k=kv_type, type_v=kv_type)
    own_ids = llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=False)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    generated = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
        generated.append(int(token))
        if len(generated) == NEW_TOKENS:
            break
    llm.close()
    return own_ids, logits, generated


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gguf-check-"))
    demo = generate_model(work / "llama", 0, dtype="float32")
    models = {
        "llama (demo)": demo,
        "mistral": tiny_model(work / "mistral", "mistral", demo),
        "qwen3": tiny_model(work / "qwen3", "qwen3", demo),
    }
    rows = []
    for label, model_dir in models.items():
        ids, reference, hf_generated = transformers_reference(model_dir)
        scale = float(np.abs(reference).max())
        # llama.cpp's default KV cache is F16; with an F32 cache an f32 export is exact.
        runs = [("f32", "f32"), *((quant, "f16") for quant in QUANTS)]
        for quant, kv_cache in runs:
            result = export_gguf(model_dir, work / f"{model_dir.name}-{quant}.gguf", quant)
            own_ids, logits, generated = llama_cpp_run(result.path, ids, kv_cache)
            diff = float(np.abs(logits - reference).max())
            rows.append({
                "model": label, "quant": quant, "kv_cache": kv_cache,
                "tokens_match": own_ids == ids,
                "max_abs_logit_diff": diff, "max_abs_logit": scale,
                "relative": diff / scale, "greedy_match": generated == hf_generated,
                "bytes": result.bytes,
            })
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'model':<14}{'quant':<6}{'kv':<5}{'tokens':>7}{'max|Δlogit|':>13}{'max|logit|':>12}"
          f"{'relative':>10}{'greedy':>8}")
    for r in rows:
        tokens = "same" if r["tokens_match"] else "DIFF"
        print(f"{r['model']:<14}{r['quant']:<6}{r['kv_cache']:<5}{tokens:>7}"
              f"{r['max_abs_logit_diff']:>13.2e}{r['max_abs_logit']:>12.3f}{r['relative']:>10.2e}"
              f"{'same' if r['greedy_match'] else 'diff':>8}")


if __name__ == "__main__":
    main()
