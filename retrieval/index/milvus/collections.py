"""The collections of one index in Milvus, their alias, and its state and lock rows.

An index ``base`` is, per version ``n``, two collections: ``{base}_v{n}_items`` (one row per
item: ``row`` the primary key, the string ``id``, ``path``, ``captions``, ``extra`` and its
`where.filter_doc`, the image ``vector`` and its querybank normaliser ``qbnorm``) and
``{base}_v{n}_captions`` (one row per caption, with its ``item`` row and the item's filter
document, so caption searches filter on the server too). The aliases ``{base}_items`` and
``{base}_captions`` name the current version: a rebuild switches them; readers resolve the
items alias and derive the captions collection from it, so one switch moves both.

``{base}_meta`` (never versioned) holds JSON rows: ``lock`` (the one writer, across machines)
and ``state:{items collection}``: the last committed change number (rows of later changes
are invisible), the items hidden while a removal is under way, the next free rows, the
metadata fields and the counts. Every write is a pending change recorded there first, so the
next writer can roll it back (see `retrieval.index.milvus.writer`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .client import MilvusError, describe

META_DIM = 2  # Milvus wants a vector field in every collection; the meta rows ignore it
MAX_TEXT = 65_535  # Milvus's VARCHAR limit
INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "AUTOINDEX", "GPU_CAGRA")
# How stale a Bounded read may be is the server's common.gracefulTime (5000 ms by default):
# writers on a server wait it out (`retrieval.index.milvus.writer`), so the engine must know it.
# A server configured otherwise is told to the engine with $RETRIEVAL_MILVUS_GRACEFUL_MS, never
# less than the server's value (a shorter wait lets a reader see half a change; a longer one is
# only slower). milvus-lite reads are current: no wait there.
GRACEFUL_ENV = "RETRIEVAL_MILVUS_GRACEFUL_MS"
DEFAULT_GRACEFUL_MS = 5000
EXACT_BELOW = 50_000  # "auto": FLAT (exact) below this many vectors, HNSW from there


@dataclass(frozen=True)
class Names:
    """The collection names of index ``base``."""

    base: str

    @property
    def items_alias(self) -> str:
        return f"{self.base}_items"

    @property
    def captions_alias(self) -> str:
        return f"{self.base}_captions"

    @property
    def meta(self) -> str:
        return f"{self.base}_meta"

    def items(self, version: int) -> str:
        return f"{self.base}_v{version}_items"

    def captions_of(self, items: str) -> str:
        return items[: -len("_items")] + "_captions"

    def version_of(self, items: str) -> int:
        m = re.fullmatch(re.escape(self.base) + r"_v(\d+)_items", items)
        if not m:
            raise MilvusError(f"collection {items!r} is not a version of {self.base!r}")
        return int(m.group(1))


def bounded_staleness_s() -> float:
    """How stale a server's Bounded read may be, in seconds: $RETRIEVAL_MILVUS_GRACEFUL_MS (read
    at each call, so a command follows its own environment), else Milvus's default."""
    raw = os.environ.get(GRACEFUL_ENV, "").strip()
    if not raw:
        return DEFAULT_GRACEFUL_MS / 1000
    if not re.fullmatch(r"[0-9]+", raw):
        raise MilvusError(
            f"${GRACEFUL_ENV} is {raw!r}: give the Milvus server's common.gracefulTime in "
            f"whole milliseconds (unset: Milvus's default, {DEFAULT_GRACEFUL_MS})"
        )
    return int(raw) / 1000


def base_name(name: str) -> str:
    """A Milvus collection-name base for index ``name``: letters, digits and underscores, and a
    hash of the name itself, so that names Milvus cannot spell apart (``a-b``, ``a.b``) and
    names ending like a version (``a_v2``) never share collections."""
    clean = re.sub(r"[^A-Za-z0-9_]", "_", name)[:100]
    return f"retrieval_{clean}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def model_key(model: str, pretrained: str | None, sha256: str | None, random_init: bool) -> str:
    """The model whose vectors a version holds, as the state row records it (a checkpoint by
    its hash: the same weights at another path are the same model)."""
    weights = sha256 or pretrained or ("random" if random_init else "none")
    return f"{model}:{weights}"


@dataclass(frozen=True)
class State:
    """What readers and writers agree on about one version; stored as one meta row."""

    committed: int = 0  # rows whose ``batch`` is above this are not published yet
    hiding: tuple[int, ...] = ()  # item rows removed (invisible), not yet deleted
    hidden_at: float = 0.0  # when rows were last hidden (time.time())
    next_row: int = 0
    next_caption: int = 0
    fields: tuple[str, ...] = ()  # metadata keys of the items (for the unknown-field check)
    items: int = 0
    captions: int = 0
    pending: dict[str, Any] | None = None  # the add under way: {"op": "add", "batch": b}
    model: str = ""  # whose vectors these are (`model_key`); readers check it

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "hiding": list(self.hiding), "fields": list(self.fields)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> State:
        return cls(**{**d, "hiding": tuple(d["hiding"]), "fields": tuple(d["fields"])})

    def visible(self, row_field: str = "row") -> str:
        """The filter that shows only published rows (``row_field``: the item row's name)."""
        out = f"batch <= {self.committed}"
        return out + (f" and {row_field} not in {list(self.hiding)}" if self.hiding else "")

    def reader_filter(self, row_field: str, current: bool) -> str:
        """`visible` for a reader, or "" where nothing needs hiding: no change under way, none
        hidden, and reads that are ``current`` (milvus-lite's are; a server reader's view may
        lag the state row, so there every read keeps the filter). Milvus-lite filters every
        row of a collection, which costs a search ~160 ms at 100k items."""
        if current and self.pending is None and not self.hiding:
            return ""
        return self.visible(row_field)

    def with_fields(self, keys) -> State:
        return replace(self, fields=tuple(sorted(set(self.fields) | set(keys))))


def item_schema(client, dim: int):
    from pymilvus import DataType

    s = client.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("row", DataType.INT64, is_primary=True)
    s.add_field("id", DataType.VARCHAR, max_length=MAX_TEXT)
    s.add_field("path", DataType.VARCHAR, max_length=MAX_TEXT)
    for name in ("captions", "extra", "filters", "file"):
        s.add_field(name, DataType.JSON)
    s.add_field("batch", DataType.INT64)
    s.add_field("qbnorm", DataType.FLOAT)
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    return s


def caption_schema(client, dim: int):
    from pymilvus import DataType

    s = client.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("row", DataType.INT64, is_primary=True)
    s.add_field("item", DataType.INT64)
    s.add_field("id", DataType.VARCHAR, max_length=MAX_TEXT)
    s.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT)
    s.add_field("filters", DataType.JSON)
    s.add_field("batch", DataType.INT64)
    s.add_field("qbnorm", DataType.FLOAT)
    s.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    return s


def index_params(client, index_type: str, count: int):
    """Vector index parameters: inner product (unit vectors: cosine)."""
    chosen = ("FLAT" if count < EXACT_BELOW else "HNSW") if index_type == "auto" else index_type
    params = {
        "HNSW": {"M": 32, "efConstruction": 200},
        "IVF_FLAT": {"nlist": _nlist(count)},
        "IVF_SQ8": {"nlist": _nlist(count)},
        "IVF_PQ": {"nlist": _nlist(count), "m": 16, "nbits": 8},
    }.get(chosen, {})
    p = client.prepare_index_params()
    p.add_index("vector", index_type=chosen, metric_type="IP", params=params)
    return p, chosen


def search_params(index_type: str, fetch: int) -> dict[str, Any]:
    """The search knob per index type, generous enough for ``fetch`` results."""
    return {
        "HNSW": {"ef": max(128, 2 * fetch)},
        "IVF_FLAT": {"nprobe": 32},
        "IVF_SQ8": {"nprobe": 32},
        "IVF_PQ": {"nprobe": 32},
    }.get(index_type, {})


def _nlist(count: int) -> int:
    return max(1, min(4096, int(4 * count**0.5)))


def create_loading(client, name: str, schema, params) -> None:
    """Create the empty collection ``name`` with its vector index and start loading it, without
    waiting: a load takes seconds on a server whatever the size (its coordinator checks once a
    second), so a version's two collections load together, while its rows are written.
    `ensure_loaded` waits for it."""
    client.create_collection(name, schema=schema, consistency_level="Strong")
    # Created once the call returns; with no rows there is nothing to build, so no waiting for
    # the build (pymilvus polls it every 0.5 s).
    client.create_index(name, params, sync=False)
    client.load_collection(name, _async=True)


def ensure_loaded(client, *collections: str) -> None:
    """Load collections into memory where they are not (a reopened milvus-lite file, or a
    server restarted, has them released; searches and queries need them loaded)."""
    for name in collections:
        if str(client.get_load_state(name).get("state")) != "Loaded":
            client.load_collection(name)


def create_meta(client, names: Names) -> None:
    if client.has_collection(names.meta):
        ensure_loaded(client, names.meta)
        return
    from pymilvus import DataType

    s = client.create_schema(auto_id=False, enable_dynamic_field=False)
    s.add_field("key", DataType.VARCHAR, is_primary=True, max_length=512)
    s.add_field("value", DataType.JSON)
    s.add_field("v", DataType.FLOAT_VECTOR, dim=META_DIM)
    p = client.prepare_index_params()
    p.add_index("v", index_type="FLAT", metric_type="L2")
    client.create_collection(names.meta, schema=s, index_params=p, consistency_level="Strong")


def read_row(client, names: Names, key: str, strong: bool = True) -> Any:
    """One meta row's value (None: no such row). ``strong``: as of now (writers); else with
    bounded staleness (readers: a Strong read waits for the server's next time tick)."""
    rows = client.query(
        names.meta, filter=f"key == {json.dumps(key)}", output_fields=["value"],
        consistency_level="Strong" if strong else "Bounded",
    )  # fmt: skip
    return rows[0]["value"]["v"] if rows else None


def write_row(client, names: Names, key: str, value: Any) -> None:
    """Upsert one meta row: Milvus writes a row whole, so readers see the old or the new."""
    row = {"key": key, "value": {"v": value}, "v": [0.0] * META_DIM}  # an object: Milvus 2.3
    client.upsert(names.meta, [row])


def delete_row(client, names: Names, key: str) -> None:
    client.delete(names.meta, filter=f"key == {json.dumps(key)}")


def keys_of(client, names: Names, items: str) -> list[str]:
    """The meta rows of version ``items``: its state, and its changes' history and skips."""
    found = []
    for prefix in (f"state:{items}", f"history:{items}:", f"skipped:{items}:"):
        rows = client.query(
            names.meta, filter=f"key like {json.dumps(prefix + '%')}", output_fields=["key"],
            consistency_level="Strong",
        )  # fmt: skip
        found += [r["key"] for r in rows]
    return found


def rows_with_prefix(client, names: Names, prefix: str) -> list[Any]:
    """The values of every meta row whose key starts with ``prefix``, in key order."""
    rows = client.query(
        names.meta, filter=f"key like {json.dumps(prefix + '%')}", output_fields=["key", "value"],
        consistency_level="Strong",
    )  # fmt: skip
    return [r["value"]["v"] for r in sorted(rows, key=lambda r: r["key"])]


def read_state(client, names: Names, items: str, strong: bool = False) -> State:
    value = read_row(client, names, f"state:{items}", strong)
    if value is None:
        raise MilvusError(f"collection {items} has no state row in {names.meta}: not built here")
    return State.from_json(value)


def write_state(client, names: Names, items: str, state: State) -> None:
    write_row(client, names, f"state:{items}", state.to_json())


def current(client, names: Names) -> str | None:
    """The items collection the alias names now (None: the index is not in Milvus)."""
    try:
        if names.items_alias not in _aliases(client):
            return None
        return client.describe_alias(names.items_alias)["collection_name"]
    except Exception as e:
        raise MilvusError(f"cannot read alias {names.items_alias}: {describe(e)}") from None


def switch(client, names: Names, items: str) -> None:
    """Point both aliases at version ``items``; readers follow the items alias alone."""
    aliases = _aliases(client)
    for alias, target in (
        (names.items_alias, items),
        (names.captions_alias, names.captions_of(items)),
    ):
        if alias in aliases:
            client.alter_alias(target, alias)
        else:
            client.create_alias(target, alias)


def _aliases(client) -> list[str]:
    found = client.list_aliases()
    return list(found.get("aliases", [])) if isinstance(found, dict) else list(found)


def versions(client, names: Names) -> list[str]:
    """Every items collection of this index, oldest first."""
    found = [
        c
        for c in client.list_collections()
        if re.fullmatch(rf"{re.escape(names.base)}_v\d+_items", c)
    ]
    return sorted(found, key=names.version_of)


@dataclass
class Loaded:
    """The collections a reader uses now, with their state (one per query)."""

    items: str
    captions: str
    state: State
    index_types: dict[str, str] = field(default_factory=dict)
