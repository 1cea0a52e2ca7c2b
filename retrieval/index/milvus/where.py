"""``--where`` conditions as Milvus filter expressions, with the FAISS backend's semantics.

`retrieval.corpus.filters` compares equality as text (any element of a list field) and
comparisons as numbers (a value that is not a number never matches). Milvus cannot convert
JSON values, so each item carries a ``filter_doc`` of its metadata, already converted:
``{"t": {key: [text, ...]}, "n": {key: number}, "k": [key, ...]}`` (keys hex-encoded); the
expressions read that (with functions Milvus 2.3 servers have too).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ...corpus.filters import Condition, _number
from ...errors import SearchError

FIELD = "filters"
_LARGEST = (
    1.7976931348623157e308  # the JSON field of the items collection that holds the filter document
)


def filter_doc(extra: dict[str, Any]) -> dict[str, Any]:
    """The filter document of an item's metadata ``extra``."""
    texts = {
        _hex(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in extra.items()
    }
    # JSON has no infinity: the largest double compares with every finite bound as it does;
    # NaN compares false with everything, so it is left out (never matches, as on FAISS).
    numbers = {
        _hex(k): max(-_LARGEST, min(_LARGEST, n))
        for k, v in extra.items()
        if (n := _number(v)) is not None and not math.isnan(n)
    }
    return {"t": texts, "n": numbers, "k": sorted(_hex(k) for k in extra)}


def _hex(key: str) -> str:
    """A metadata key as Milvus can name it in a JSON path: its UTF-8 bytes in hex (Milvus
    splits a path on quotes and brackets without unescaping, so a key holding them would
    match nothing)."""
    return "h" + key.encode().hex()


def expression(conditions: tuple[Condition, ...]) -> str:
    """One Milvus boolean expression that holds where every condition does."""
    return " and ".join(f"({_one(c)})" for c in conditions)


def _one(c: Condition) -> str:
    texts, number = _path("t", c.key), _path("n", c.key)
    bounds = [c.value, c.high] if c.op == "range" else [] if c.op in ("=", "!=") else [c.value]
    if not all(math.isfinite(float(b)) for b in bounds):
        raise SearchError(
            f"the Milvus backend cannot compare with {c.value!r}: give a finite number"
        )
    if c.op == "=":
        return f"json_contains({texts}, {_string(c.value)})"
    if c.op == "!=":
        has = f'json_contains({FIELD}["k"], {_string(_hex(c.key))})'  # `exists` is 2.4+
        return f"{has} and not json_contains({texts}, {_string(c.value)})"
    if c.op == "range":
        return f"{number} >= {float(c.value)!r} and {number} <= {float(c.high)!r}"
    return f"{number} {c.op} {float(c.value)!r}"


def _path(part: str, key: str) -> str:
    return f"{FIELD}[{_string(part)}][{_string(_hex(key))}]"


def _string(text: str) -> str:
    """A Milvus string literal: JSON's escaping (quotes, backslashes, control characters)."""
    return json.dumps(text, ensure_ascii=False)
