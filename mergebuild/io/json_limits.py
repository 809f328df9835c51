"""JSON from files we did not write, with bounded size and nesting: every failure a ValueError."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_MAX_BYTES",
    "INDEX_MAX_BYTES",
    "MAX_DEPTH",
    "PROVENANCE_MAX_BYTES",
    "RECORD_MAX_BYTES",
    "TOKENIZER_MAX_BYTES",
    "loads_bounded",
    "nesting_depth",
    "read_bytes_bounded",
    "read_json_bounded",
]

# Deeper than any real config, tokenizer, index or statement (a statement nests ~10 deep);
# shallow enough that nothing which walks the value recursively can run out of stack.
MAX_DEPTH = 100
# Real config.json / generation_config.json files are a few KiB.
CONFIG_MAX_BYTES = 4 << 20
# The largest real tokenizer.json files (250k-token vocabularies) are ~35 MiB.
TOKENIZER_MAX_BYTES = 128 << 20
# An index of 100,000 tensors is ~10 MiB.
INDEX_MAX_BYTES = 64 << 20
# refs/, pins/ and lock records are a few hundred bytes.
RECORD_MAX_BYTES = 1 << 20
# A statement grows by ~4 KiB per upstream stage: 256 MiB is a chain 60,000 stages deep.
PROVENANCE_MAX_BYTES = 256 << 20


def loads_bounded(text: str | bytes, *, max_depth: int = MAX_DEPTH,
                  object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None
                  ) -> Any:
    """``json.loads`` that refuses values nested more than ``max_depth`` deep, before
    parsing them (so neither the parser nor anything walking the value runs out of stack).

    Raises:
        ValueError: not JSON, or nested too deeply (a ``json.JSONDecodeError`` for both,
            so callers that catch either keep working); the message is one short line.
    """
    doc = text if isinstance(text, str) else text.decode("utf-8", errors="replace")
    if nesting_depth(doc) > max_depth:
        raise json.JSONDecodeError(f"nested more than {max_depth} deep", "", 0)
    try:
        return json.loads(doc, object_pairs_hook=object_pairs_hook)
    except RecursionError:  # only if the scan above was fooled by text that is not JSON
        raise json.JSONDecodeError(f"nested more than {max_depth} deep", "", 0) from None


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def nesting_depth(text: str) -> int:
    """How deeply arrays and objects nest in JSON ``text``, from its brackets alone: strings
    are dropped and the rest reduced to brackets by regular expressions (C speed), so a
    document of megabytes is scanned in milliseconds."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    steps = brackets.translate(_STEP)
    # Each opening bracket is "(" and each closing one ")": the depth is the running sum.
    depth = deepest = 0
    for run in _RUNS.finditer(steps):
        depth += len(run.group()) if run.group()[0] == "(" else -len(run.group())
        deepest = max(deepest, depth)
    return deepest


_STEP = str.maketrans("[{]}", "(())")
_RUNS = re.compile(r"\(+|\)+")


def read_bytes_bounded(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path``, refused when it is larger than ``max_bytes``.

    Raises:
        OSError: unreadable.
        ValueError: larger than ``max_bytes`` (one line saying so, with the limit).
    """
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{Path(path).name} is larger than its {max_bytes}-byte limit")
    return data


def read_json_bounded(path: Path, max_bytes: int, *, max_depth: int = MAX_DEPTH) -> Any:
    """JSON from ``path``, at most ``max_bytes`` and nested at most ``max_depth`` deep.

    Raises:
        OSError: unreadable.
        ValueError: too large, not UTF-8, not JSON or nested too deeply (one line).
    """
    data = read_bytes_bounded(path, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return loads_bounded(text, max_depth=max_depth)
