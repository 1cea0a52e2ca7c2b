"""Metadata fields: conditions for searches (``key=value``, ``key>=3``, ``key<2.5``,
``key=1..9``), the check that a named field exists, and groups of equal values.

Equality compares as text, and matches a list-valued field when any element matches; the
comparisons and ranges compare as numbers (a value that is not a number never matches).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorpusError, SearchError

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


def unknown_field(keys, fields) -> str | None:
    """The message for the first of ``keys`` that is not among ``fields`` (a typo, most
    likely: say so rather than match nothing); None when all are known."""
    if unknown := sorted(set(keys) - set(fields)):
        known = ", ".join(sorted(fields)[:12]) or "none"
        return f"no item has the field {unknown[0]!r} (fields: {known})"
    return None


def matches_all(conditions: tuple[Condition, ...], extra: dict[str, Any]) -> bool:
    return all(c.matches(extra) for c in conditions)


def check_field(records: Sequence, key: str) -> None:
    """CorpusError when no record carries metadata field ``key`` (a typo, most likely)."""
    if records and (msg := unknown_field([key], {k for r in records for k in r.extra})):
        raise CorpusError(msg)


def group_codes(records: Sequence, key: str) -> np.ndarray:
    """(N,) int64: equal codes for records with equal ``extra[key]``; a record without the
    field (or null) is a group of its own, not one with every other such record."""
    values = [r.extra.get(key) for r in records]
    labels = [
        json.dumps(["<own>", i] if v is None else v, sort_keys=True) for i, v in enumerate(values)
    ]
    index = {label: g for g, label in enumerate(dict.fromkeys(labels))}
    return np.array([index[label] for label in labels], dtype=np.int64)
