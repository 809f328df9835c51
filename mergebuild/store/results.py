"""Evaluation results in the store, keyed by (model digest, eval definition digest, evaluator
version), and each node's history of what it was scored as (for reasons and ``--diff``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from mergebuild.io.hashing import canonical_json
from mergebuild.store.objects import Store, _read_json

__all__ = ["ResultStore", "result_key"]

# A node's history keeps this many distinct model digests (the current and earlier builds).
_HISTORY = 20


def result_key(model_digest: str, eval_digest: str, evaluator_version: int) -> str:
    """sha256 hex naming one result: the model's bytes, the eval's identity, the evaluator."""
    text = canonical_json({"model": model_digest, "eval": eval_digest,
                           "evaluator": evaluator_version})
    return hashlib.sha256(text.encode()).hexdigest()


class ResultStore:
    """``<store>/evals/results/<k[:2]>/<k>.json`` per result and ``<store>/evals/nodes/<node>.json``
    per node: its model digests, newest last, each with the eval digests it was scored on.

    A result is a pure function of its key, so a merge rebuilt to identical bytes, or the same
    model under another node name, finds it.
    """

    def __init__(self, store: Store):
        self.store = store
        self.root = store.root / "evals"

    def _path(self, key: str) -> Path:
        return self.root / "results" / key[:2] / f"{key}.json"

    def read(self, model_digest: str, eval_digest: str, evaluator_version: int
             ) -> dict[str, Any] | None:
        """The stored result record, or None."""
        record = _read_json(self._path(result_key(model_digest, eval_digest, evaluator_version)))
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            return None
        return record

    def write(self, record: dict[str, Any]) -> None:
        """Store ``record`` (``model``, ``eval_digest``, ``evaluator``, ``metrics``…)."""
        path = self._path(result_key(record["model"], record["eval_digest"], record["evaluator"]))
        self._write(path, record, f"cannot store the result of eval '{record.get('eval')}'")

    def history(self, node: str) -> list[dict[str, Any]]:
        """``[{"digest": model digest, "evals": {name: eval digest}}, ...]``, oldest first."""
        data = _read_json(self._node_path(node))
        return data if isinstance(data, list) else []

    def remember(self, node: str, model_digest: str, name: str, eval_digest: str) -> None:
        """Record that ``node``, as ``model_digest``, was scored on eval ``name``."""
        history = self.history(node)
        if not history or history[-1].get("digest") != model_digest:
            history = [h for h in history if h.get("digest") != model_digest]
            history.append({"digest": model_digest, "evals": {}})
        if history[-1]["evals"].get(name) == eval_digest:
            return
        history[-1]["evals"][name] = eval_digest
        self._write(self._node_path(node), history[-_HISTORY:],
                    f"cannot record the evaluations of '{node}'", node=node)

    def _node_path(self, node: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in node)
        return self.root / "nodes" / f"{safe}.json"

    def _write(self, path: Path, record: Any, what: str, node: str | None = None) -> None:
        from mergebuild.io.atomic import write_json_atomic

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, record, indent=1, trailing_newline=True)
        except OSError as exc:
            raise self.store.os_error(exc, what, node=node) from None
