"""YAML loading that remembers the line of every mapping and key, for errors that point at them.

Documents are built straight from libyaml's events (the C parser: a 10,000-node Mergefile
loads in a fraction of a second, where PyYAML's Python composer takes ten), with the
SafeLoader's meaning for every scalar. Aliases are shared, never copied, and may add at most
``MAX_ALIAS_NODES`` nodes to the document once expanded, so a few hundred bytes of nested
aliases (a "billion laughs" bomb) are refused at load instead of growing without bound in
an error line, a model card or memory; nesting is bounded by ``MAX_DEPTH``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode
from yaml.resolver import BaseResolver, Resolver

from mergebuild.errors import MergefileError, shorten

MAX_ALIAS_NODES = 100_000  # nodes aliases may add once expanded (a real file needs far fewer)
MAX_DEPTH = 100  # nested mappings and lists (a Mergefile needs about 8)

_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML was built with it
_STR, _MAP, _SEQ = BaseResolver.DEFAULT_SCALAR_TAG, "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
# YAML 1.2 floats too: PyYAML (YAML 1.1) reads `1e-5` (no dot) as a string; mergekit's
# configs write tolerances so and mergekit reads them as numbers.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
_IMPLICIT = {first: [*resolvers, *(
    [("tag:yaml.org,2002:float", _EXPONENT_FLOAT)] if first in "-+0123456789" and first else [])]
    for first, resolvers in Resolver.yaml_implicit_resolvers.items()}
_CONSTRUCT = yaml.SafeLoader.yaml_constructors
_MERGE = "tag:yaml.org,2002:merge"


class LineDict(dict):
    """A dict that remembers the line of each key (1-based) and of itself, and which keys
    YAML read as numbers (``010:`` is the integer 8): ``key_texts`` maps them to their text."""

    line: int = 0
    key_lines: dict
    key_texts: dict

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)

    def written_as_number(self, key: str) -> str | None:
        """The text of ``key`` if YAML read it as a number (it was not quoted), else None."""
        return getattr(self, "key_texts", {}).get(key)


def load_yaml(text: str, file: str) -> Any:
    """Parse ``text`` (one document); mappings come back as :class:`LineDict`. Syntax errors,
    alias bombs and over-deep nesting are MergefileErrors that name the line."""
    documents = load_yaml_documents(text, file)
    if len(documents) > 1:
        raise MergefileError("expected a single YAML document, found another one", file=file,
                             hint="remove the '---' line, or split the file")
    return documents[0] if documents else None


def load_yaml_documents(text: str, file: str) -> list[Any]:
    """Every document of ``text`` (a ``---``-separated stream), as :func:`load_yaml` reads one."""
    try:
        return _Builder(file).documents(_Parser(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MergefileError(
            f"YAML syntax error: {problem}", file=file, line=line, hint="fix the YAML syntax"
        ) from None


class _Open:
    """A mapping or list being filled, with what it has read so far."""

    __slots__ = ("anchor", "key", "key_line", "key_lines", "key_text", "merges", "start",
                 "value")

    def __init__(self, value: Any, anchor: str | None, start: int, is_map: bool):
        self.value = value
        self.anchor = anchor
        self.start = start  # nodes read before it: its size is the count at its end less this
        # A list has neither a pending key nor merges (None): the fast path appends to it.
        self.key: Any = _NO_KEY if is_map else None
        self.key_line = 0
        self.key_lines: dict | None = value.key_lines if is_map else None
        self.key_text: str | None = None
        self.merges: list[tuple[Any, int]] | None = [] if is_map else None


_NO_KEY = object()


class _Builder:
    """Turns parser events into Python values (what ``yaml.safe_load`` gives, mappings as
    LineDicts), counting what aliases add."""

    def __init__(self, file: str):
        self.file = file
        self.constructor = yaml.SafeLoader("")  # its scalar constructors, never its parser
        self.anchors: dict[str, tuple[Any, int]] = {}
        self.alias_nodes = 0

    def error(self, message: str, event: Any, hint: str | None = None) -> MergefileError:
        return MergefileError(message, file=self.file, line=event.start_mark.line + 1,
                              hint=hint)

    def documents(self, parser: Any) -> list[Any]:
        out = []
        try:
            while True:
                event = parser.get_event()
                if isinstance(event, StreamEndEvent) or event is None:
                    return out
                if isinstance(event, DocumentStartEvent):
                    self.anchors = {}
                    out.append(self.document(parser))
                elif not isinstance(event, (StreamStartEvent, DocumentEndEvent)):
                    raise self.error("unexpected YAML event", event)
        finally:
            dispose = getattr(parser, "dispose", None)
            if dispose is not None:
                dispose()

    def document(self, parser: Any) -> Any:
        """One document's value. The hot loop of a large Mergefile (~20 events a node): the
        common cases (a plain string key, a value for the pending key, a list item) are
        handled inline; sizes come from one running count of nodes, aliases expanded."""
        stack: list[_Open] = []
        top: _Open | None = None
        result: Any = None
        get_event = parser.get_event
        anchors = self.anchors
        # Plain scalars that YAML resolves (numbers, booleans, null) repeat: each text is
        # constructed once. Every such value is immutable (a datetime too).
        resolved: dict[str, Any] = {}
        count = 0  # nodes read so far in this document, each alias counted as what it adds
        while True:
            event = get_event()
            kind = type(event)
            if kind is ScalarEvent:  # most events: checked first, strings without a call
                count += 1
                text = event.value
                if event.tag is None and event.anchor is None:
                    if not event.implicit[0] or text[:1] not in _IMPLICIT:
                        value = text
                    elif text in resolved:
                        value = resolved[text]
                    else:
                        value = resolved[text] = self.scalar(event)
                else:
                    value = self.scalar(event)
                    if event.anchor is not None:
                        anchors[event.anchor] = (value, 1)
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                if len(stack) >= MAX_DEPTH:
                    raise self.error(f"YAML nested more than {MAX_DEPTH} levels deep", event,
                                     "a Mergefile needs a handful of levels")
                is_map = kind is MappingStartEvent
                if event.tag is not None and event.tag not in ("!", _MAP if is_map else _SEQ):
                    raise self.error(f"unsupported YAML tag {shorten(event.tag)}", event,
                                     "write plain YAML mappings and lists")
                if is_map:
                    mapping = LineDict()
                    mapping.line, mapping.key_lines, mapping.key_texts = (
                        event.start_mark.line + 1, {}, {})
                    top = _Open(mapping, event.anchor, count, True)
                else:
                    top = _Open([], event.anchor, count, False)
                count += 1
                stack.append(top)
                continue
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                done = stack.pop()
                top = stack[-1] if stack else None
                if done.merges:
                    self.merge_keys(done)
                value, size = done.value, count - done.start
                if done.anchor is not None:
                    anchors[done.anchor] = (value, size)
            elif kind is AliasEvent:
                value, size = self.alias(event)
                count += size
            elif kind is DocumentEndEvent:
                return result
            else:
                raise self.error("unexpected YAML event", event)
            if top is None:
                result = value
            elif top.merges is None:  # a list
                top.value.append(value)
            elif top.key is _NO_KEY and type(value) is str:  # a plain key
                top.key, top.key_line, top.key_text = value, event.start_mark.line + 1, None
            elif type(top.key) is str and top.key not in top.value:  # a key's value
                key = top.key
                top.value[key] = value
                top.key_lines[key] = top.key_line  # type: ignore[index]
                if top.key_text is not None:
                    top.value.key_texts[key] = top.key_text
                top.key = _NO_KEY
            else:  # anything unusual: a key that is not a string, a duplicate, a merge key
                self.add(top, value, event)

    def alias(self, event: Any) -> tuple[Any, int]:
        if event.anchor not in self.anchors:
            raise self.error(f"undefined YAML alias *{shorten(event.anchor, quote=False)}",
                             event, "define the anchor (&name) before using it")
        value, size = self.anchors[event.anchor]
        self.alias_nodes += size
        if self.alias_nodes > MAX_ALIAS_NODES:
            raise self.error(f"YAML aliases expand to more than {MAX_ALIAS_NODES:,} nodes",
                             event, "write the values out instead of nesting aliases")
        return value, size

    def add(self, parent: _Open, value: Any, event: Any) -> None:
        mapping: LineDict = parent.value
        if parent.key is _NO_KEY:  # this value is a key
            line = event.start_mark.line + 1
            if isinstance(value, _MergeKey):
                parent.key, parent.key_line = value, line
                return
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise MergefileError(f"mapping key {shorten(value)} must be a string",
                                     file=self.file, line=line)
            parent.key_text = (None if isinstance(value, str)
                               else getattr(event, "value", str(value)))
            parent.key, parent.key_line = str(value), line
            return
        key, line = parent.key, parent.key_line
        parent.key = _NO_KEY
        if isinstance(key, _MergeKey):
            parent.merges.append((value, line))
            return
        if key in mapping:
            raise MergefileError(
                f"duplicate key '{shorten(key, quote=False)}' (first at line "
                f"{mapping.key_lines[key]})", file=self.file, line=line,
                hint="each name may appear once in a mapping")
        mapping[key] = value
        mapping.key_lines[key] = line
        if parent.key_text is not None:
            mapping.key_texts[key] = parent.key_text

    def merge_keys(self, done: _Open) -> None:
        """``<<: *defaults`` (or a list of them): keys the mapping does not set itself; the
        first mapping listed wins, as in PyYAML."""
        mapping: LineDict = done.value
        merged: dict[str, tuple[Any, int]] = {}
        for value, line in done.merges or ():
            for source in value if isinstance(value, list) else [value]:
                if not isinstance(source, LineDict):
                    raise MergefileError("'<<' merges mappings only", file=self.file, line=line)
                for key, item in source.items():
                    merged.setdefault(key, (item, line))
        for key, (item, line) in merged.items():
            if key not in mapping:
                mapping[key] = item
                mapping.key_lines[key] = line

    def scalar(self, event: ScalarEvent) -> Any:
        tag = event.tag
        if tag is None or tag == "!":
            if tag == "!" or not event.implicit[0]:
                return event.value  # quoted, or the non-specific tag: a string
            tag = _resolve_plain(event.value)
            if tag == _STR:
                return event.value
            if tag == _MERGE:
                return _MergeKey()
        constructor = _CONSTRUCT.get(tag)
        if constructor is None or tag in (_MAP, _SEQ) or tag.endswith((":omap", ":pairs", ":set")):
            raise self.error(f"unsupported YAML tag {shorten(tag)}", event,
                             "write plain YAML values")
        node = ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
        try:
            return constructor(self.constructor, node)
        except (yaml.YAMLError, ValueError, TypeError) as exc:
            raise self.error(f"cannot read {shorten(event.value)} as {tag.rsplit(':', 1)[-1]}: "
                             f"{shorten(str(exc).splitlines()[0], quote=False)}", event) from None


class _MergeKey:
    """A ``<<`` key: the value's mappings are merged in when the mapping ends."""


def _resolve_plain(value: str) -> str:
    """The tag SafeLoader gives an unquoted scalar (null, bool, int, float, timestamp, ...)."""
    for tag, regexp in _IMPLICIT.get(value[:1] if value else "", ()):
        if regexp.match(value):
            return tag
    return _STR


def line_of(obj: Any, default: int) -> int:
    """The line of a mapping read by :func:`load_yaml`, else ``default``."""
    return obj.line if isinstance(obj, LineDict) else default


def plain(obj: Any) -> Any:
    """``obj`` as plain dicts and lists (what ``yaml.safe_dump`` can write)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj
