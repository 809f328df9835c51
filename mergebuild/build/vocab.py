"""Tokenizer policies: the output vocabulary and each parent's embedding rows mapped by token."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mergebuild.errors import IncompatibleModelsError

VOCAB_TENSOR_HINTS = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_out",
                      "output.weight")


def is_vocab_tensor(name: str) -> bool:
    return any(h in name for h in VOCAB_TENSOR_HINTS)


def _tokenizer_json(directory: Path) -> dict | None:
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def vocab_of_tokenizer(data: Mapping[str, Any]) -> dict[str, int]:
    """token → id of a tokenizers ``tokenizer.json`` (model vocabulary plus added tokens)."""
    model_vocab = (data.get("model") or {}).get("vocab") or {}
    if isinstance(model_vocab, list):  # Unigram: [[piece, score], ...], id = position
        vocab = {entry[0]: i for i, entry in enumerate(model_vocab)}
    else:
        vocab = dict(model_vocab)
    for entry in data.get("added_tokens") or []:
        vocab[entry["content"]] = entry["id"]
    return vocab


def read_vocab(directory: Path, node: str) -> dict[str, int]:
    """A parent's token → id mapping (tokenizer.json, else vocab.json + added_tokens.json)."""
    data = _tokenizer_json(directory)
    if data is not None:
        return vocab_of_tokenizer(data)
    vocab_file = Path(directory) / "vocab.json"
    if vocab_file.is_file():
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        added = Path(directory) / "added_tokens.json"
        if added.is_file():
            vocab.update(json.loads(added.read_text(encoding="utf-8")))
        return vocab
    raise IncompatibleModelsError(
        f"'{node}' has no tokenizer.json, so its embedding rows cannot be mapped by token",
        hint="give every parent its tokenizer files, or drop tokenizer_source",
    )


def union_tokenizer(base: Mapping[str, Any], others: Sequence[tuple[Mapping[str, Any], int]]
                    ) -> dict:
    """The base tokenizer plus every token the others have and it lacks, as added tokens.

    Args:
        base: the base (donor) ``tokenizer.json``.
        others: (``tokenizer.json``, rows the model really has) for every parent, in order;
            tokens at or past a model's rows are padding and are skipped, as mergekit does.
    Returns:
        The merged ``tokenizer.json``. New tokens get ids after the base's, ordered by
        parent, then by their id in that parent (mergekit's order follows a hash map).
    """
    out = copy.deepcopy(dict(base))
    out["added_tokens"] = list(out.get("added_tokens") or [])
    vocab = vocab_of_tokenizer(out)
    next_id = max(vocab.values(), default=-1) + 1

    def add(entry: dict) -> None:
        nonlocal next_id
        if entry["content"] in vocab:
            return
        out["added_tokens"].append({**entry, "id": next_id})
        vocab[entry["content"]] = next_id
        next_id += 1

    added_of = []
    for data, rows in others:
        added = {e["content"]: e for e in data.get("added_tokens") or [] if e["id"] < rows}
        added_of.append(added)
        for token, idx in sorted(vocab_of_tokenizer(data).items(), key=lambda kv: kv[1]):
            if idx < rows and token not in added:
                add({"content": token, "single_word": False, "lstrip": False, "rstrip": False,
                     "normalized": True, "special": False})
    for added in added_of:
        for entry in sorted(added.values(), key=lambda e: e["id"]):
            add({k: v for k, v in entry.items() if k != "id"})
    return out


@dataclass(frozen=True)
class VocabPlan:
    """How every parent's vocabulary rows map onto the output vocabulary."""

    rows: int  # output rows (the output vocabulary, padded to pad_to_multiple_of)
    tokens: int  # tokens in the output vocabulary
    permutations: Mapping[str, tuple[int, ...]]  # node → parent row per output token, -1 absent
    base: str | None
    tokenizer: dict | None  # a new tokenizer.json to write (union, added tokens), else None
    identity: bool  # every parent already has the output vocabulary, row for row
    rules: tuple[TokenRule, ...] = ()  # per-token embedding sources (tokenizer.tokens)


@dataclass(frozen=True)
class TokenRule:
    """One token's embedding source (mergekit's ``tokenizer.tokens``), resolved to rows.

    ``kind``: "zero", "row" (``model``'s own row ``row``) or "default" (mergekit's rule for
    a token a parent lacks). ``force``: every parent takes it, not only those lacking the
    token.
    """

    token: str
    out_id: int
    kind: str
    model: str | None = None
    row: int | None = None
    force: bool = False


def plan_vocab(policy: str, donor: str, base: str | None, nodes: Sequence[str],
               directories: Mapping[str, Path], rows: Mapping[str, int],
               pad_to_multiple_of: int | None = None, tokens: Sequence[Any] = ()) -> VocabPlan:
    """The output vocabulary of a tokenizer policy and each parent's row permutation.

    Args:
        policy: ``"base"``, ``"union"`` or ``"model"`` (the donor's tokenizer).
        donor: the node whose tokenizer is the output's (base, else the first model, else
            the named model).
        base: the merge's base_model (its rows fill tokens a parent lacks), or None.
        nodes: every parent whose vocabulary tensors are read, base included.
        directories: each node's model directory.
        rows: each node's embedding rows.
        tokens: ``TokenEmbeddingSpec`` entries (``tokenizer.tokens``); a token the output
            vocabulary lacks is added to it, as mergekit does.
    """
    vocabs = {n: read_vocab(directories[n], n) for n in nodes}
    vocabs.setdefault(donor, read_vocab(directories[donor], donor))
    tokenizer = None
    if policy == "union":
        data = {n: _tokenizer_json(directories[n]) for n in dict.fromkeys([donor, *nodes])}
        missing = [n for n, d in data.items() if d is None]
        if missing:
            raise IncompatibleModelsError(
                f"tokenizer_source union needs tokenizer.json, which '{missing[0]}' lacks",
                hint="use tokenizer_source: base, or add the tokenizer files")
        donor_rows = rows.get(donor, len(vocabs[donor]))
        stripped = _strip(data[donor], donor_rows)  # type: ignore[arg-type]
        tokenizer = union_tokenizer(stripped, [(d, rows.get(n, len(vocabs[n])))
                                               for n, d in data.items()])  # type: ignore[misc]
        out_vocab = vocab_of_tokenizer(tokenizer)
    else:
        out_vocab = vocabs[donor]
    missing_tokens = [t.token for t in tokens if t.token not in out_vocab]
    if missing_tokens:
        if tokenizer is None:
            data = _tokenizer_json(directories[donor])
            if data is None:
                raise IncompatibleModelsError(
                    f"adding token {missing_tokens[0]!r} needs the tokenizer.json that "
                    f"'{donor}' lacks", hint="give the tokenizer's model its tokenizer files")
            tokenizer = copy.deepcopy(data)
        tokenizer = _add_tokens(tokenizer, missing_tokens)
        out_vocab = vocab_of_tokenizer(tokenizer)
    tokens_count = max(out_vocab.values(), default=-1) + 1
    padded = tokens_count
    if pad_to_multiple_of and padded % pad_to_multiple_of:
        padded = (padded // pad_to_multiple_of + 1) * pad_to_multiple_of
    perms: dict[str, tuple[int, ...]] = {}
    for n in nodes:
        p = [-1] * tokens_count
        limit = rows[n]
        for token, idx in vocabs[n].items():
            new = out_vocab.get(token)
            if new is not None and idx < limit:
                p[new] = idx
        perms[n] = tuple(p)
    rules = tuple(_token_rule(t, out_vocab, perms, vocabs, rows) for t in tokens)
    identity = not rules and padded == tokens_count and all(
        rows[n] == padded and perms[n] == tuple(range(tokens_count)) for n in nodes)
    return VocabPlan(rows=padded, tokens=tokens_count, permutations=perms, base=base,
                     tokenizer=tokenizer, identity=identity, rules=rules)


def _add_tokens(tokenizer: Mapping[str, Any], new_tokens: Sequence[str]) -> dict:
    """``tokenizer.json`` with ``new_tokens`` added after its last id (as ``add_tokens``)."""
    out = copy.deepcopy(dict(tokenizer))
    out["added_tokens"] = list(out.get("added_tokens") or [])
    next_id = max(vocab_of_tokenizer(out).values(), default=-1) + 1
    for token in new_tokens:
        out["added_tokens"].append({"id": next_id, "content": token, "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": True,
                                    "special": False})
        next_id += 1
    return out


def _token_rule(spec: Any, out_vocab: Mapping[str, int], perms: Mapping[str, tuple[int, ...]],
                vocabs: Mapping[str, Mapping[str, int]], rows: Mapping[str, int]) -> TokenRule:
    """A ``tokens:`` entry resolved against the output vocabulary and the models' rows."""
    out_id = out_vocab[spec.token]
    if spec.kind is None:
        return TokenRule(spec.token, out_id, "default", force=spec.force)
    if spec.kind == "zero":
        return TokenRule(spec.token, out_id, "zero", force=spec.force)
    model = spec.model
    if model not in perms:
        raise IncompatibleModelsError(
            f"token {spec.token!r} takes its embedding from '{model}', whose vocabulary "
            "tensors this merge does not read here",
            hint="name a model that is merged at the embeddings (with slices: a source of the "
                 "first and of the last slice)")
    if spec.kind == "model":
        row = perms[model][out_id]
        if row < 0:
            raise IncompatibleModelsError(f"token {spec.token!r} is not in '{model}'s vocabulary",
                                          hint="use {kind: model_token, model: M, token: T}")
    elif spec.token_id is not None:
        row = spec.token_id
    else:
        row = vocabs[model].get(spec.source_token, -1)
        if row < 0:
            raise IncompatibleModelsError(
                f"token {spec.source_token!r} is not in '{model}'s vocabulary")
    if row >= rows[model]:
        raise IncompatibleModelsError(
            f"token {spec.token!r}: row {row} is out of range for '{model}' ({rows[model]} rows)")
    return TokenRule(spec.token, out_id, "row", model=model, row=row, force=spec.force)


def _strip(data: Mapping[str, Any], rows: int) -> dict:
    """A tokenizer without tokens at or past the model's rows (mergekit strips the base)."""
    out = copy.deepcopy(dict(data))
    out["added_tokens"] = [e for e in out.get("added_tokens") or [] if e["id"] < rows]
    model = out.get("model") or {}
    if isinstance(model.get("vocab"), dict):
        model["vocab"] = {t: i for t, i in model["vocab"].items() if i < rows}
    return out


def remap_rows(tensors: Sequence[Any], nodes: Sequence[str], plan: VocabPlan,
               base: str | None = None) -> list[Any]:
    """Each parent's vocabulary tensor (rows first) re-indexed to the output vocabulary.

    mergekit's rule for a token a parent lacks: the row of the only parent that has it, else
    the base's row when the base has it, else the mean of the rows of the parents that have
    it (zeros if none). Rows past the vocabulary (padding) are the mean of the token rows.
    """
    import torch

    perms = torch.tensor([plan.permutations[n] for n in nodes], dtype=torch.long)
    present = perms >= 0
    gathered = torch.stack([t[p.clamp(min=0)] for t, p in zip(tensors, perms, strict=True)])
    mask = present.reshape(*present.shape, *([1] * (gathered.dim() - 2))).to(gathered.dtype)
    count = present.sum(0)
    mean = (gathered * mask).sum(0) / count.clamp(min=1).reshape(
        -1, *([1] * (gathered.dim() - 2))).to(gathered.dtype)
    default = mean
    base = base or plan.base
    if base is not None and base in nodes:
        b = list(nodes).index(base)
        has = present[b].reshape(-1, *([1] * (gathered.dim() - 2)))
        default = torch.where(has, gathered[b], mean)
    # tokenizer.tokens: the configured embedding replaces a parent's missing row (or every
    # parent's row, forced); computed from the parents' original rows, as mergekit does.
    overrides = []
    for rule in plan.rules:
        if rule.kind == "zero":
            embed = torch.zeros_like(gathered[0, rule.out_id])
        elif rule.kind == "row":
            if rule.model not in nodes:
                raise IncompatibleModelsError(
                    f"token {rule.token!r} takes its embedding from '{rule.model}', which is "
                    "not merged at this tensor", hint="with slices, name a source of the first "
                    "and of the last slice")
            embed = tensors[list(nodes).index(rule.model)][rule.row]
        else:
            embed = default[rule.out_id]
        overrides.append((rule, embed))
    out = []
    for i in range(len(nodes)):
        row_ok = present[i].reshape(-1, *([1] * (gathered.dim() - 2)))
        rows = torch.where(row_ok, gathered[i], default)
        for rule, embed in overrides:
            if rule.force or not present[i, rule.out_id]:
                rows[rule.out_id] = embed
        if plan.rows > plan.tokens:
            pad = rows.mean(0, keepdim=True).expand(plan.rows - plan.tokens, *rows.shape[1:])
            rows = torch.cat([rows, pad])
        out.append(rows)
    return out


def harmonize_metadata(job: Any, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata as the compatibility check should see it once rows are mapped by token.

    With a tokenizer policy, vocabulary sizes may differ (the policy resolves them); every
    other dimension is still checked. Without one, the metadata is returned unchanged.
    """
    if not getattr(job, "tokenizer_source", None):
        return dict(metadata)
    out = {}
    for node, meta in metadata.items():
        config = dict(meta.config)
        config.pop("vocab_size", None)
        tensors = {name: (dtype, (0, *shape[1:]) if is_vocab_tensor(name) and shape else shape)
                   for name, (dtype, shape) in meta.tensors.items()}
        out[node] = replace(meta, config=config, tensors=tensors)
    return out


def write_vocab_files(plan: VocabPlan, out_dir: Path, files: dict[str, tuple[str, int]]) -> None:
    """Rewrite config.json's vocab_size and (union) tokenizer.json in a built directory."""

    def put(name: str, data: bytes) -> None:
        path = Path(out_dir) / name
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        files[name] = (hashlib.sha256(data).hexdigest(), len(data))

    config_path = Path(out_dir) / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("vocab_size") != plan.rows:
            config["vocab_size"] = plan.rows
            put("config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    if plan.tokenizer is not None:
        put("tokenizer.json", json.dumps(plan.tokenizer, ensure_ascii=False, indent=2).encode())
        tokenizer_config = Path(out_dir) / "tokenizer_config.json"
        if tokenizer_config.is_file():
            data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
            data["added_tokens_decoder"] = added_tokens_decoder(plan.tokenizer)
            put("tokenizer_config.json",
                (json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode())


def added_tokens_decoder(tokenizer: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json's ``added_tokens_decoder`` for a ``tokenizer.json``: its added
    tokens by id, so transformers sees the same ids and special flags in both files."""
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    defaults = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
                "special": False}
    return {str(e["id"]): {k: e.get(k, defaults.get(k)) for k in keys}
            for e in sorted(tokenizer.get("added_tokens") or [], key=lambda e: e["id"])}


__all__ = ["TokenRule", "VocabPlan", "added_tokens_decoder", "harmonize_metadata", "is_vocab_tensor",
           "plan_vocab", "read_vocab", "remap_rows", "union_tokenizer", "vocab_of_tokenizer",
           "write_vocab_files"]
