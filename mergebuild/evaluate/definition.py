"""What an evaluation is: a frozen definition with a canonical identity and metric directions."""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from mergebuild.errors import EvaluationError
from mergebuild.io.hashing import canonical_json

__all__ = ["EVALUATOR_VERSION", "EvalDefinition", "Progress", "file_sha256"]

# Bump when any evaluator returns different numbers for the same model and definition, so
# cached results keyed by (model digest, definition digest, EVALUATOR_VERSION) go stale.
EVALUATOR_VERSION = 1

# progress(done, total): called as items are evaluated.
Progress = Callable[[int, int], None]


def file_sha256(path: Path) -> str:
    """sha256 hex of a file's bytes; an `EvaluationError` when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        raise EvaluationError(f"cannot read evaluation data {path}: {error.strerror}") from None
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class EvalDefinition(abc.ABC):
    """Base of every kind's definition: its fields are the parameters of the evaluation.

    Fields typed as paths name data files; the identity records their sha256, not their
    location, so moving a data file keeps cached results and editing it invalidates them.
    """

    kind: ClassVar[str] = ""

    def data_files(self) -> dict[str, Path]:
        """{field name: file} of the files whose bytes decide the result."""
        files = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, Path):
                files[field.name] = value
            elif isinstance(value, tuple) and value and all(isinstance(v, Path) for v in value):
                files |= {f"{field.name}[{i}]": v for i, v in enumerate(value)}
        return files

    def params(self) -> dict[str, Any]:
        """The parameters that are not data files, as plain JSON values."""
        files = {name.split("[")[0] for name in self.data_files()}
        return {
            field.name: _plain(getattr(self, field.name))
            for field in dataclasses.fields(self)
            if field.name not in files and field.metadata.get("identity", True)
        }

    def identity(self) -> dict[str, Any]:
        """Canonical description: kind, parameters and data files' sha256."""
        return {
            "kind": self.kind,
            "params": self.params(),
            "data": {name: file_sha256(path) for name, path in sorted(self.data_files().items())},
        }

    def digest(self) -> str:
        """sha256 hex of the canonical JSON of `identity`."""
        return hashlib.sha256(canonical_json(self.identity()).encode()).hexdigest()

    @abc.abstractmethod
    def higher_is_better(self, metric: str) -> bool | None:
        """Whether a larger value of `metric` is better (None: a count, not a score)."""


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
