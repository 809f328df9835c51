"""PEFT's ``rank_pattern``/``alpha_pattern`` keys matched in linear time, never by backtracking.

PEFT (``peft.utils.other.get_pattern_key``) tries each key in order and takes the first for
which ``re.match(rf"(.*\\.)?({key})$", module_name)`` succeeds: the key is a regular
expression that must match the whole module name or a suffix of it that starts after a dot.
Handing an adapter's keys to ``re`` lets a crafted key (``(a+)+b``…) backtrack for hours, so
keys are parsed with ``re``'s own parser (linear) and run here as a Thompson NFA: time
proportional to name length × pattern size, whatever the pattern. Backreferences and
lookarounds, which no NFA can run, are refused, as are keys too large to be a module path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from re import _constants as sre  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]

__all__ = ["MAX_PATTERN_LENGTH", "ModulePattern", "PatternError"]

# Longer than any real module path or pattern; keeps parsing and the NFA small.
MAX_PATTERN_LENGTH = 512
_MAX_STATES = 4096

Predicate = Callable[[str], bool]


class PatternError(ValueError):
    """A pattern key that is not a regular expression, or one that needs backtracking."""


_CATEGORIES: dict[object, Predicate] = {
    sre.CATEGORY_DIGIT: str.isdigit,
    sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdigit(),
    sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
}


def _equals(char: str) -> Predicate:
    return lambda c: c == char


class ModulePattern:
    """One pattern key, compiled to an NFA; :meth:`matches` is PEFT's test for a module name."""

    def __init__(self, key: str):
        if not isinstance(key, str):
            raise PatternError(f"pattern key {key!r} is not a string")
        if len(key) > MAX_PATTERN_LENGTH:
            raise PatternError(f"pattern key of {len(key)} characters (limit "
                               f"{MAX_PATTERN_LENGTH})")
        try:
            parsed = sre_parse.parse(key)
        except (re.error, RecursionError, OverflowError) as exc:
            raise PatternError(f"pattern key '{key}' is not a regular expression "
                               f"({exc})") from None
        if parsed.state.flags & ~(re.UNICODE | re.ASCII):
            raise PatternError(f"pattern key '{key}' sets flags, which PEFT's keys do not use")
        items = list(parsed)
        self.key = key
        self.anchored = bool(items) and items[0][0] is sre.AT and items[0][1] is sre.AT_BEGINNING
        if self.anchored:
            items = items[1:]
        while items and items[-1][0] is sre.AT and items[-1][1] in (sre.AT_END,
                                                                     sre.AT_END_STRING):
            items = items[:-1]  # PEFT appends '$' itself
        self._edges: list[list[tuple[Predicate, int]]] = []
        self._eps: list[list[int]] = []
        self._start = self._new()
        self._accept = self._sequence(items, self._start)
        self._closures: dict[int, frozenset[int]] = {}

    def matches(self, name: str) -> bool:
        """Whether ``re.match(rf"(.*\\.)?({key})$", name)`` would succeed."""
        starts = self._closure(self._start)
        current = set(starts)
        for ch in name:
            following: set[int] = set()
            for state in current:
                for predicate, target in self._edges[state]:
                    if predicate(ch):
                        following |= self._closure(target)
            current = following
            if ch == "." and not self.anchored:
                current |= starts  # the key may begin after any dot
            if not current and self.anchored:
                return False
        return self._accept in current

    # -- building the NFA -----------------------------------------------------------------
    def _new(self) -> int:
        if len(self._edges) >= _MAX_STATES:
            raise PatternError(f"pattern key '{self.key}' is too complex (its repetitions "
                               "expand past the limit)")
        self._edges.append([])
        self._eps.append([])
        return len(self._edges) - 1

    def _sequence(self, items, start: int) -> int:
        for op, av in items:
            start = self._item(op, av, start)
        return start

    def _item(self, op, av, start: int) -> int:
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            end = self._new()
            self._edges[start].append((self._predicate(op, av), end))
            return end
        if op is sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise PatternError(f"pattern key '{self.key}' sets flags inside a group")
            return self._sequence(sub, start)
        if op is sre.BRANCH:
            end = self._new()
            for branch in av[1]:
                self._eps[self._sequence(branch, start)].append(end)
            return end
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", None)):
            low, high, sub = av
            for _ in range(low):
                start = self._sequence(sub, start)
            if high is sre.MAXREPEAT:
                loop = self._new()
                self._eps[start].append(loop)
                self._eps[self._sequence(sub, loop)].append(loop)
                return loop
            end = self._new()
            for _ in range(high - low):
                self._eps[start].append(end)
                start = self._sequence(sub, start)
            self._eps[start].append(end)
            return end
        raise PatternError(f"pattern key '{self.key}' uses {str(op).lower()}, which needs "
                           "backtracking; write the module path, with '.', '*', [...] or (a|b)")

    def _predicate(self, op, av) -> Predicate:
        if op is sre.LITERAL:
            char = chr(av)
            return lambda c: c == char
        if op is sre.NOT_LITERAL:
            char = chr(av)
            return lambda c: c != char
        if op is sre.ANY:
            return lambda c: c != "\n"
        negate = bool(av) and av[0][0] is sre.NEGATE
        tests: list[Predicate] = []
        for kind, value in av[1:] if negate else av:
            if kind is sre.LITERAL:
                tests.append(_equals(chr(value)))
            elif kind is sre.RANGE:
                tests.append(lambda c, lo=value[0], hi=value[1]: lo <= ord(c) <= hi)
            elif kind is sre.CATEGORY and value in _CATEGORIES:
                tests.append(_CATEGORIES[value])
            else:
                raise PatternError(f"pattern key '{self.key}' uses an unsupported character "
                                   "class")
        if negate:
            return lambda c: not any(t(c) for t in tests)
        return lambda c: any(t(c) for t in tests)

    def _closure(self, state: int) -> frozenset[int]:
        found = self._closures.get(state)
        if found is None:
            seen = {state}
            stack = [state]
            while stack:
                for target in self._eps[stack.pop()]:
                    if target not in seen:
                        seen.add(target)
                        stack.append(target)
            found = self._closures[state] = frozenset(seen)
        return found
