"""Tiny Llama-layout models with real, measurable skills: a base and four fine-tunes of it.

`train_family` trains a ``base`` on plain synthetic sentences, then four fine-tunes of it that
each learn one synthetic skill: ``math`` (two-digit plus one-digit addition), ``code`` (closing
brackets), ``chat`` (answering a question about a sentence) and ``instruct`` (reversing a
word). All five share one shape, so every merge method applies, and evaluation means
something: each fine-tune answers its own skill's held-out prompts and the others do not.
Training is plain torch (the Llama forward is written here, so the base install needs no
transformers), seeded, single-threaded and deterministic; it takes minutes on two cores, so the
trained weights ship in `skill_weights/` and `generate_skill_models` writes model directories
from them (idempotent, like the demo family). ``python -m mergebuild.sources.skills train OUT``
reproduces the weights; ``data OUT`` the held-out evaluation sets in `skill_data/`.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergebuild.sources.demo import _generate_once, byte_to_unicode

if TYPE_CHECKING:
    import torch

__all__ = [
    "FAMILY",
    "SKILLS",
    "SKILL_DATA",
    "WEIGHTS_DIR",
    "SkillShape",
    "Training",
    "build_model",
    "encode",
    "eval_examples",
    "generate_skill_models",
    "perplexity_text",
    "skill_examples",
    "train_family",
    "train_model",
    "write_family_weights",
    "write_model_files",
    "write_skill_data",
]

# Bump when the bytes trained for the same parameters change, so old directories rebuild.
_FORMAT_VERSION = 1
SKILL_DATA = Path(__file__).parent / "skill_data"
SKILLS = ("math", "code", "chat", "instruct")

# --------------------------------------------------------------------------- tokenizer
# Byte level without merges: every character is one token, so digits and brackets line up
# with positions (which makes the skills learnable by a tiny model) and no text is unknown.
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
BOS, EOS, PAD = 1, 2, 3
_BYTE_OFFSET = len(_SPECIAL_TOKENS)
VOCAB_SIZE = _BYTE_OFFSET + 256


def encode(text: str) -> list[int]:
    """Token ids of `text` as the written tokenizer.json produces them (``<s>`` first)."""
    return [BOS, *(_BYTE_OFFSET + b for b in text.encode("utf-8"))]


def _decode(ids: list[int]) -> str:
    return bytes(i - _BYTE_OFFSET for i in ids if i >= _BYTE_OFFSET).decode("utf-8", "replace")


def _tokenizer() -> dict:
    """A Hugging Face `tokenizers` JSON: one token per byte, specials first, prepends <s>."""
    to_char = byte_to_unicode()
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    vocab |= {to_char[b]: _BYTE_OFFSET + b for b in range(256)}
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    special = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
               "special": True}
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": t, **special} for i, t in enumerate(_SPECIAL_TOKENS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}},
        },
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>",
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
            "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": [],
        },
    }


def _tokenizer_config() -> dict:
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
               "special": True}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "added_tokens_decoder": {
            str(i): {"content": t, **special} for i, t in enumerate(_SPECIAL_TOKENS)
        },
    }


# --------------------------------------------------------------------------- data
# Every skill is a prompt and an answer; a model has the skill when greedy decoding after the
# prompt yields exactly the answer, then </s>. Held-out evaluation items never appear in
# training: they are drawn first, and training draws skip them.

_NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lou",
          "Max", "Ned", "Oda", "Pam", "Roy", "Sue", "Tom", "Uma", "Vic", "Wes", "Yul", "Zoe")
_COLORS = ("red", "blue", "green", "black", "white", "pink", "gray", "brown", "gold", "tan")
_OBJECTS = ("ball", "car", "hat", "cup", "box", "kite", "bag", "pen", "lamp", "shoe", "coat",
            "book")
_ANIMALS = ("cat", "dog", "fox", "owl", "cow", "pig", "hen", "bee", "ant", "elk")
_VERBS = ("sees", "likes", "finds", "chases", "helps", "meets", "hears", "feeds")
_PLACES = ("park", "house", "garden", "river", "shop", "field", "school", "road")
_BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _math(rng: random.Random) -> tuple[str, str]:
    # Two digits plus one: carries are needed, yet a 4-layer width-64 model learns it in
    # seconds (two digits plus two took >2000 steps to pass 30%).
    a, b = rng.randrange(100), rng.randrange(10)
    return f"{a}+{b}=", f"{a + b}"


def _code(rng: random.Random) -> tuple[str, str]:
    opens = "".join(rng.choice("([{<") for _ in range(rng.randint(1, 6)))
    return f"close {opens} ", "".join(_BRACKETS[c] for c in reversed(opens))


def _chat(rng: random.Random) -> tuple[str, str]:
    name, color, thing = rng.choice(_NAMES), rng.choice(_COLORS), rng.choice(_OBJECTS)
    return f"Q: {name} has a {color} {thing}. What color?\nA: ", color


def _instruct(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 6)))
    return f"reverse {word} -> ", word[::-1]


_SKILL_DRAWS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "math": _math, "code": _code, "chat": _chat, "instruct": _instruct,
}


def _sentence(rng: random.Random) -> str:
    """One line of the base corpus: plain sentences, lists and counts, none of the skills."""
    kind = rng.randrange(4)
    if kind == 0:
        return (f"The {rng.choice(_COLORS)} {rng.choice(_ANIMALS)} {rng.choice(_VERBS)} "
                f"a {rng.choice(_ANIMALS)} in the {rng.choice(_PLACES)}.")
    if kind == 1:
        return (f"{rng.choice(_NAMES)} has a {rng.choice(_COLORS)} {rng.choice(_OBJECTS)} "
                f"and {rng.choice(_NAMES)} has a {rng.choice(_OBJECTS)}.")
    if kind == 2:
        start = rng.randrange(90)
        return "Count: " + " ".join(str(n) for n in range(start, start + rng.randint(3, 6))) + "."
    word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 7)))
    marks = "".join(rng.choice("([{<>}])") for _ in range(rng.randint(2, 5)))
    return f"The word {word} and the marks {marks} end here."


def _document(rng: random.Random) -> str:
    """A base-corpus document: one to three lines, so the base also learns line breaks."""
    return "\n".join(_sentence(rng) for _ in range(rng.randint(1, 3)))


_EVAL_SIZE = 200
_EVAL_SEED = 1_000


def eval_examples(skill: str) -> list[tuple[str, str]]:
    """The held-out (prompt, answer) pairs of `skill` (distinct; never trained on)."""
    rng = random.Random(f"eval:{skill}:{_EVAL_SEED}")
    seen: dict[str, str] = {}
    while len(seen) < _EVAL_SIZE:
        prompt, answer = _SKILL_DRAWS[skill](rng)
        seen.setdefault(prompt, answer)
    return list(seen.items())


def skill_examples(skill: str, seed: int) -> Iterator[tuple[str, str]]:
    """An endless stream of training (prompt, answer) pairs of `skill`, held-out ones skipped."""
    held_out = {prompt for prompt, _ in eval_examples(skill)}
    rng = random.Random(f"train:{skill}:{seed}")
    while True:
        prompt, answer = _SKILL_DRAWS[skill](rng)
        if prompt not in held_out:
            yield prompt, answer


def perplexity_text() -> str:
    """Held-out base-corpus text for perplexity (a different seed than training)."""
    rng = random.Random("eval:text")
    return "\n".join(_sentence(rng) for _ in range(120))


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class SkillShape:
    """The one shape every model of the family shares (they must be mergeable)."""

    hidden_size: int = 64
    num_layers: int = 4
    intermediate_size: int = 192
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5


def _modules(shape: SkillShape):
    """Build the module tree whose state_dict names are Hugging Face Llama's."""
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(shape.hidden_size))

        def forward(self, x):
            variance = x.float().pow(2).mean(-1, keepdim=True)
            return self.weight * (x.float() * torch.rsqrt(variance + shape.rms_norm_eps))

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            h, d = shape.hidden_size, shape.hidden_size // shape.num_heads
            self.q_proj = nn.Linear(h, shape.num_heads * d, bias=False)
            self.k_proj = nn.Linear(h, shape.num_kv_heads * d, bias=False)
            self.v_proj = nn.Linear(h, shape.num_kv_heads * d, bias=False)
            self.o_proj = nn.Linear(shape.num_heads * d, h, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            d = shape.hidden_size // shape.num_heads
            q = self.q_proj(x).view(b, t, shape.num_heads, d).transpose(1, 2)
            k = self.k_proj(x).view(b, t, shape.num_kv_heads, d).transpose(1, 2)
            v = self.v_proj(x).view(b, t, shape.num_kv_heads, d).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            groups = shape.num_heads // shape.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            h, i = shape.hidden_size, shape.intermediate_size
            self.gate_proj = nn.Linear(h, i, bias=False)
            self.up_proj = nn.Linear(h, i, bias=False)
            self.down_proj = nn.Linear(i, h, bias=False)

        def forward(self, x):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn, self.mlp = Attention(), MLP()
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(), RMSNorm()

        def forward(self, x, cos, sin):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(VOCAB_SIZE, shape.hidden_size)
            self.layers = nn.ModuleList(Layer() for _ in range(shape.num_layers))
            self.norm = RMSNorm()

    class CausalLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Decoder()
            self.lm_head = nn.Linear(shape.hidden_size, VOCAB_SIZE, bias=False)

        def forward(self, ids):
            d = shape.hidden_size // shape.num_heads
            inv_freq = 1.0 / shape.rope_theta ** (torch.arange(0, d, 2).float() / d)
            freqs = torch.arange(ids.shape[1]).float()[:, None] * inv_freq[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            cos, sin = angles.cos(), angles.sin()
            x = self.model.embed_tokens(ids)
            for layer in self.model.layers:
                x = layer(x, cos, sin)
            return self.lm_head(self.model.norm(x))

    return CausalLM()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def build_model(shape: SkillShape = SkillShape()) -> torch.nn.Module:
    """A fresh CausalLM with Llama's parameter names, initialised like Hugging Face's."""
    import torch

    model = _modules(shape)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    return model


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Training:
    """How one model of the family is trained.

    Attributes:
        skill: the skill learnt (None: the base corpus, loss on every token).
        steps, batch_size, learning_rate: AdamW with warm-up then cosine decay to 10%.
        seed: seeds the initial weights (base only) and the order of the examples.
        replay: base-corpus lines added to each fine-tuning batch (loss on every token), so a
            fine-tune keeps the base's language and stays near it, as real fine-tunes do.
    """

    skill: str | None
    steps: int
    batch_size: int
    learning_rate: float
    seed: int
    replay: int = 0


def _batches(training: Training) -> Iterator[tuple[list[list[int]], list[list[int]]]]:
    """(token ids, loss mask) batches; fine-tunes learn only the answer and </s>."""
    rng = random.Random(f"train:base:{training.seed}")
    if training.skill is None:
        pairs = (("", _document(rng)) for _ in iter(int, 1))
    else:
        pairs = skill_examples(training.skill, training.seed)
    # Replay single lines: whole documents would pad every row of a batch to their length.
    replay = (("", _sentence(rng)) for _ in iter(int, 1))
    while True:
        ids, masks = [], []
        drawn = [next(pairs) for _ in range(training.batch_size)]
        drawn += [next(replay) for _ in range(training.replay)]
        for prompt, answer in drawn:
            prompt_ids = encode(prompt)
            answer_ids = [_BYTE_OFFSET + b for b in answer.encode("utf-8")] + [EOS]
            ids.append(prompt_ids + answer_ids)
            masks.append([0] * len(prompt_ids) + [1] * len(answer_ids))
        yield ids, masks


def _train(model: torch.nn.Module, training: Training) -> float:
    """Train `model` in place; returns the mean loss of the last 20 steps."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=training.learning_rate,
                                  betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, training.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, training.steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses: list[float] = []
    batches = _batches(training)
    for _ in range(training.steps):
        ids, masks = next(batches)
        width = max(map(len, ids))
        tokens = torch.tensor([row + [PAD] * (width - len(row)) for row in ids])
        mask = torch.tensor([row + [0] * (width - len(row)) for row in masks], dtype=torch.float32)
        logits = model(tokens[:, :-1])
        loss_each = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB_SIZE), tokens[:, 1:].reshape(-1), reduction="none")
        weights = mask[:, 1:].reshape(-1)
        loss = (loss_each * weights).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / len(losses[-20:])


# The family: the base learns the corpus from random weights; each fine-tune starts from the
# base's trained weights and learns one skill. Exact match on the 200 held-out prompts of each
# skill, measured with mergebuild.evaluate (every other model scores 0.00 on every skill):
#   math 0.99, code 0.90, chat 1.00, instruct 1.00 (chat_choices: chat 1.00, others 0.23-0.34);
#   perplexity of skill_data/text.txt (window 128, stride 64): base 1.75, fine-tunes 3.3-5.2.
FAMILY: dict[str, Training] = {
    "base": Training(None, steps=400, batch_size=16, learning_rate=3e-3, seed=0),
    "math": Training("math", steps=800, batch_size=32, learning_rate=2e-3, seed=1, replay=4),
    "code": Training("code", steps=800, batch_size=32, learning_rate=2e-3, seed=2, replay=4),
    "chat": Training("chat", steps=200, batch_size=32, learning_rate=2e-3, seed=3, replay=4),
    "instruct": Training("instruct", steps=600, batch_size=32, learning_rate=2e-3, seed=4,
                         replay=4),
}
_DTYPE = "bfloat16"
WEIGHTS_DIR = Path(__file__).parent / "skill_weights"


def train_model(training: Training, start: dict[str, torch.Tensor] | None = None,
                shape: SkillShape = SkillShape()) -> tuple[dict[str, torch.Tensor], float]:
    """Train one model (from `start` weights, or from weights seeded by ``training.seed``).

    Returns its float32 state dict (sorted names) and its final loss. Deterministic: one
    thread, deterministic algorithms, seeded weights and data, so the bytes repeat on one
    machine. Another CPU's kernels may round differently, which is why the trained weights
    ship in `skill_weights/` rather than being retrained on every install.
    """
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(training.seed)
        model = build_model(shape)
        if start is not None:
            model.load_state_dict(start)
        loss = _train(model, training)
        return {k: v.detach().clone() for k, v in sorted(model.state_dict().items())}, loss
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train_family(shape: SkillShape = SkillShape(),
                 log: Callable[[str], None] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Train the whole family from scratch; returns {name: bfloat16 state dict}."""
    import torch

    family, base = {}, None
    for name, training in FAMILY.items():
        started = time.perf_counter()
        state, loss = train_model(training, None if training.skill is None else base, shape)
        if training.skill is None:
            base = state
        family[name] = {k: v.to(getattr(torch, _DTYPE)).contiguous() for k, v in state.items()}
        if log:
            log(f"{name}: {training.steps} steps, final loss {loss:.4f}, "
                f"{time.perf_counter() - started:.1f} s")
    return family


# --------------------------------------------------------------------------- model directories


def _config(shape: SkillShape) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "head_dim": shape.hidden_size // shape.num_heads,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": 256,
        "mlp_bias": False,
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": _DTYPE,
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_model_files(directory: Path, shape: SkillShape = SkillShape()) -> None:
    """Write everything but the weights: config, generation config and tokenizer files."""
    _write_json(directory / "config.json", _config(shape))
    _write_json(directory / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": BOS, "eos_token_id": EOS,
        "pad_token_id": PAD, "do_sample": False,
    })
    _write_json(directory / "tokenizer.json", _tokenizer())
    _write_json(directory / "tokenizer_config.json", _tokenizer_config())
    _write_json(directory / "special_tokens_map.json", {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"})


def _shipped_weights(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def generate_skill_models(root: Path, names: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write (or keep) the trained family ``base``, ``math``, ``code``, ``chat``, ``instruct``.

    The weights are the shipped ones (`skill_weights/`, produced by `train_family`), so every
    machine gets the same bytes in milliseconds.

    Args:
        root: directory that receives one sub-directory per model.
        names: the models to write (default: the whole family).

    Returns:
        {model name: its directory}.

    Example:
        >>> paths = generate_skill_models(Path("models"))
        >>> sorted(paths)
        ['base', 'chat', 'code', 'instruct', 'math']
    """
    import hashlib
    import shutil

    out = {}
    for name in FAMILY if names is None else names:
        source = _shipped_weights(name)
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        marker = {"format": _FORMAT_VERSION, "family": "skills", "model": name,
                  "weights_sha256": digest, **asdict(SkillShape())}
        out[name] = directory = Path(root) / name

        def write(staging: Path, source: Path = source) -> None:
            shutil.copyfile(source, staging / "model.safetensors")
            write_model_files(staging)

        _generate_once(directory, marker, write)
    return out


def write_family_weights(family: dict[str, dict[str, torch.Tensor]], directory: Path) -> None:
    """Save each trained state dict as ``<name>.safetensors`` (what `skill_weights/` holds)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for name, tensors in family.items():
        save_file(tensors, str(directory / f"{name}.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------- evaluation data


def write_skill_data(directory: Path) -> None:
    """Write the held-out evaluation sets: ``<skill>.jsonl`` ({prompt, answer}),
    ``chat_choices.jsonl`` (with ``choices``) and ``text.txt`` (for perplexity)."""
    directory.mkdir(parents=True, exist_ok=True)
    for skill in SKILLS:
        lines = [json.dumps({"prompt": p, "answer": a}) for p, a in eval_examples(skill)]
        (directory / f"{skill}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rng = random.Random("eval:chat_choices")
    lines = []
    for prompt, answer in eval_examples("chat"):
        choices = [answer, *rng.sample([c for c in _COLORS if c != answer], 3)]
        rng.shuffle(choices)
        lines.append(json.dumps({"prompt": prompt, "answer": answer, "choices": choices}))
    (directory / "chat_choices.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (directory / "text.txt").write_text(perplexity_text(), encoding="utf-8")


def _main() -> None:
    """``python -m mergebuild.sources.skills train OUT``: retrain the family into OUT;
    ``data OUT``: rewrite the evaluation sets."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mergebuild.sources.skills")
    parser.add_argument("what", choices=("train", "data"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.what == "data":
        write_skill_data(args.out)
        return
    family = train_family(log=lambda line: print(line, flush=True))
    write_family_weights(family, args.out)


if __name__ == "__main__":
    _main()
