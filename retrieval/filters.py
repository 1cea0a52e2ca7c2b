"""Metadata conditions for searches: ``key=value``, ``key>=3``, ``key<2.5``, ``key=1..9``.

Equality compares as text, and matches a list-valued field when any element matches; the
comparisons and ranges compare as numbers (a value that is not a number never matches).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import SearchError

_COND = re.compile(r"^\s*([^=<>!\s]+)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$")


@dataclass(frozen=True)
class Condition:
    key: str
    op: str  # one of = != > >= < <= range
    value: str
    high: str | None = None  # upper bound of a range

    def matches(self, extra: dict[str, Any]) -> bool:
        if self.key not in extra:
            return False
        got = extra[self.key]
        if self.op in ("=", "!="):
            values = got if isinstance(got, list) else [got]
            hit = any(str(v) == self.value for v in values)
            return hit if self.op == "=" else not hit
        number = _number(got)
        if number is None:
            return False
        if self.op == "range":
            return float(self.value) <= number <= float(self.high)
        bound = float(self.value)
        return {
            ">": number > bound,
            ">=": number >= bound,
            "<": number < bound,
            "<=": number <= bound,
        }[self.op]


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def parse(text: str) -> Condition:
    """One condition from its text form; `SearchError` with the accepted forms if malformed."""
    m = _COND.match(text)
    if not m or not m.group(3):
        raise SearchError(
            f"bad condition {text!r}: use key=value, key!=value, key>=n, key<n or key=lo..hi"
        )
    key, op, value = m.groups()
    if op == "=" and ".." in value:
        lo, hi = value.split("..", 1)
        if _number(lo) is None or _number(hi) is None:
            raise SearchError(f"bad range in {text!r}: both ends must be numbers")
        return Condition(key, "range", lo, hi)
    if op not in ("=", "!=") and _number(value) is None:
        raise SearchError(f"bad condition {text!r}: {op} needs a number")
    return Condition(key, op, value)


def matches_all(conditions: tuple[Condition, ...], extra: dict[str, Any]) -> bool:
    return all(c.matches(extra) for c in conditions)
