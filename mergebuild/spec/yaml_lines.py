"""YAML loading that remembers the line of every mapping and key, for errors that point at them."""

from __future__ import annotations

import re
from typing import Any

import yaml

from mergebuild.errors import MergefileError


class LineDict(dict):
    """A dict that remembers the line of each key (1-based) and of itself."""

    line: int = 0
    key_lines: dict

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    result = LineDict()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, (str, int, float, bool)) or isinstance(key, bool):
            raise MergefileError(f"mapping key {key!r} must be a string", line=line)
        key = str(key)
        if key in result:
            raise MergefileError(
                f"duplicate key '{key}' (first at line {result.key_lines[key]})",
                line=line,
                hint="each name may appear once in a mapping",
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-5` (no dot) as a string; mergekit's configs
# write tolerances so and mergekit reads them as numbers.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads YAML 1.2 floats such as ``1e-5`` (mergekit configs)."""


for _loader in (_LineLoader, ConfigLoader):
    _loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT,
                                  list("-+0123456789"))


def load_yaml(text: str, file: str) -> Any:
    """Parse ``text``; mappings come back as :class:`LineDict`. Syntax errors name the line."""
    try:
        return yaml.load(text, Loader=_LineLoader)
    except MergefileError as exc:
        exc.file = file
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MergefileError(
            f"YAML syntax error: {problem}", file=file, line=line, hint="fix the YAML syntax"
        ) from None


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
