"""Every error a user can cause, as a small tree of named classes.

    MergebuildError                 base; carries the node name and a hint
    ├── MergefileError              bad YAML, unknown keys, wrong parameters (file:line)
    ├── GraphError                  unknown reference, cycle, missing target
    ├── SourceError                 source directory or hub repo unusable
    ├── CheckpointError             unreadable, truncated or unsafe weights file
    ├── IncompatibleModelsError     parents that cannot be merged (names, shapes, vocab)
    ├── StoreError                  store locked, full disk, corrupt object
    ├── EvaluationError             an evaluation cannot run or its output is unusable
    ├── ExecutorError               a build worker died; an executor cannot start
    └── BuildInterrupted            Ctrl-C / SIGTERM during a build

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``.
"""

from __future__ import annotations

import reprlib
from typing import Any

QUOTE_LIMIT = 200  # characters of a user's value quoted in an error (a long path still fits)
MESSAGE_LIMIT = 2000  # an error line never grows past this, whatever it quotes

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = QUOTE_LIMIT
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxlevel = 3


def shorten(value: Any, limit: int = QUOTE_LIMIT, *, quote: bool = True) -> str:
    """A user's value as an error quotes it (``repr``, or ``str`` if not ``quote``), cut to
    ``limit`` characters with the full length noted: a pasted file or an expanded YAML
    alias never becomes a megabyte-long line. Bounded work even for huge nested values."""
    if quote:
        text = _REPR.repr(value)
    elif isinstance(value, str):
        text = value
    else:
        text = _REPR.repr(value)
    if len(text) <= limit:
        return text
    total = f" ({len(value):,} characters)" if isinstance(value, str) else ""
    return text[: limit - 1] + "…" + total


class MergebuildError(Exception):
    """Base of all user-facing errors."""

    exit_code = 1

    def __init__(self, message: str, *, node: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.node = node
        self.hint = hint

    def __str__(self) -> str:
        where = f"node '{self.node}': " if self.node else ""
        hint = f" ({self.hint})" if self.hint else ""
        return _capped(f"{where}{self.message}{hint}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (make -j, Ray workers): rebuilt from their
        # attributes, whatever arguments a subclass's __init__ requires.
        return (_restore, (type(self), self.args), self.__dict__)


def _restore(cls: type[MergebuildError], args: tuple[Any, ...]) -> MergebuildError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    return error


class MergefileError(MergebuildError):
    """The Mergefile cannot be read or does not validate."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        node: str | None = None,
        hint: str | None = None,
    ):
        super().__init__(message, node=node, hint=hint)
        self.file = file
        self.line = line

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        return _capped(where + super().__str__())


class GraphError(MergefileError):
    """The nodes do not form a valid DAG, or a target is unknown."""


class SourceError(MergebuildError):
    """A source node's weights cannot be found or used."""

    exit_code = 3


class CheckpointError(MergebuildError):
    """A weights file is unreadable, truncated, unsafe or not safetensors."""

    exit_code = 3


class IncompatibleModelsError(MergebuildError):
    """Parents of a merge disagree in tensor names, shapes, dtypes or vocabulary."""

    exit_code = 3


class StoreError(MergebuildError):
    """The store cannot be written or holds a corrupt object."""

    exit_code = 4


class CorruptParentError(StoreError):
    """A parent's bytes, hashed as a child's build read them, are not what the store published.

    ``parent`` is the parent node; ``file`` the first file that differs.
    """

    def __init__(self, message: str, *, parent: str, file: str, node: str | None = None,
                 hint: str | None = None):
        super().__init__(message, node=node, hint=hint)
        self.parent = parent
        self.file = file


class SigningError(MergebuildError):
    """A signing key cannot be read, or a signature does not verify against the given key."""

    exit_code = 5


class ExecutorError(MergebuildError):
    """A build worker died (its build published nothing), or an executor cannot start."""


class BuildInterrupted(MergebuildError):
    """The build was interrupted; nothing was published."""

    exit_code = 130


def _capped(line: str) -> str:
    if len(line) <= MESSAGE_LIMIT:
        return line
    return line[: MESSAGE_LIMIT - 1] + "…"


class EvaluationError(MergebuildError):
    """An evaluation cannot run (missing package, bad data) or its command misbehaved."""

    exit_code = 6
