"""The query layer's view of a Milvus-backed index: `MilvusSpace` and `MilvusItems`.

`MilvusSpace` is a `retrieval.query.ranking.Space`: candidates come from Milvus searches
(filters pushed down as expressions), and the union is re-scored exactly from the vectors
fetched back, rounded to fp16 as the FAISS backend stores them, so both backends rank alike.
Each query starts with `refresh`: which version the alias names now and what its state row
publishes (rows of a change still under way, or being removed, are filtered out).
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

import numpy as np

from ...corpus.filters import Condition, unknown_field
from ...errors import SearchError
from ..exact import Neighbors
from . import collections as coll
from .client import MilvusError, describe
from .where import expression

# Readers read with bounded staleness: a Strong read waits for the server's next time tick
# (200-400 ms a read on Milvus 2.3 standalone, measured) where Bounded takes ~2 ms. Writers
# make that safe (`retrieval.index.milvus.writer`): rows are committed, and deleted, only
# once no bounded view can miss them or still need them.
READS = "Bounded"
MAX_LIMIT = 16_384  # Milvus's largest top-k (and query window)
_CHUNK = 1_000  # rows fetched per query by primary key


def _rows(hits) -> list[int]:
    return [int(h["entity"]["row"] if "entity" in h else h["row"]) for h in hits]


def _fp16(vectors: list) -> np.ndarray:
    """(N, D) float32, rounded through fp16 like the FAISS backend's stored copies."""
    out = np.asarray(vectors, dtype=np.float32).astype(np.float16).astype(np.float32)
    return out.reshape(len(vectors), -1)


class MilvusSpace:
    """One Milvus-backed index, as the query layer scores it (rows are Milvus primary keys)."""

    def __init__(
        self, client, names: coll.Names, beta: float, model: str, dim: int, current: bool = False
    ) -> None:
        self.client, self.names, self.beta, self.dim = client, names, beta, dim
        self.current = current  # reads see every write so far (milvus-lite)
        self.model = model  # the manifest's model identity: the collections must hold its vectors
        # One snapshot per thread (a server answers a search and an item lookup at once), taken
        # at the start of each query and never re-read within it: a rebuild or a commit in the
        # middle of a query must not mix two versions' rows.
        self._local = threading.local()
        self._types: dict[str, dict[str, str]] = {}  # items collection -> index type per kind

    @property
    def now(self) -> coll.Loaded | None:
        return getattr(self._local, "now", None)

    def refresh(self) -> coll.Loaded:
        """Follow the alias and read the state: once per query, for this thread."""
        try:
            items = coll.current(self.client, self.names)
            if items is None:
                raise SearchError(f"Milvus has no collection {self.names.items_alias}: rebuild it")
            if items not in self._types:  # a new version: load it once
                coll.ensure_loaded(
                    self.client, self.names.meta, items, self.names.captions_of(items)
                )
            state = coll.read_state(self.client, self.names, items)
            if state.model and state.model != self.model:
                raise SearchError(
                    f"Milvus collection {items} holds vectors of model {state.model}, not of "
                    f"this index's {self.model}: it was rebuilt elsewhere; copy that machine's "
                    "index folder here (its manifest), or rebuild"
                )
            types = dict(self._types.get(items, {}))
            for kind, name in (("image", items), ("caption", self.names.captions_of(items))):
                if kind not in types:
                    described = self.client.describe_index(name, "vector")
                    types[kind] = described.get("index_type", "FLAT")
        except MilvusError as e:
            raise SearchError(str(e)) from None
        except Exception as e:  # pymilvus's own errors (the server went away)
            raise SearchError(f"Milvus failed: {describe(e)}") from None
        self._types[items] = types
        self._local.now = coll.Loaded(items, self.names.captions_of(items), state, types)
        return self._local.now

    def _loaded(self) -> coll.Loaded:
        """This thread's snapshot (taken now if it has none)."""
        return self.now or self.refresh()

    def allowed(self, conditions: tuple[Condition, ...]) -> str:
        """The filter expression of ``conditions``; a one-line error for an unknown field."""
        msg = unknown_field([c.key for c in conditions], self._loaded().state.fields)
        if msg:
            raise SearchError(msg)
        return expression(conditions)

    def _search_many(self, collection: str, vecs, fetch: int, filt: str, kind: str) -> list:
        """Hits per query of ``vecs`` (Q, D), at most ``fetch`` each (Milvus's limit)."""
        now = self._loaded()
        limit = min(fetch, MAX_LIMIT)
        params = {"params": coll.search_params(now.index_types[kind], limit)}
        try:
            return self.client.search(
                collection, data=np.asarray(vecs, np.float32).tolist(), limit=limit,
                filter=filt, output_fields=["row", "item"] if kind == "caption" else ["row"],
                search_params=params, consistency_level=READS,
            )  # fmt: skip
        except Exception as e:
            raise SearchError(f"Milvus search failed: {describe(e)}") from None

    def _filter(self, allowed: str | None, item_field: str) -> str:
        visible = self._loaded().state.reader_filter(item_field, self.current)
        return " and ".join(f"({f})" for f in (visible, allowed) if f)

    def nearest_items(self, vecs: np.ndarray, fetch: int, allowed: Any) -> list[np.ndarray]:
        filt = self._filter(allowed, "row")
        found = self._search_many(self._loaded().items, vecs, fetch, filt, "image")
        return [np.array(_rows(hits), dtype=np.int64) for hits in found]

    def nearest_captions(self, vecs: np.ndarray, fetch: int, allowed: Any) -> list[np.ndarray]:
        filt = self._filter(allowed, "item")
        found = self._search_many(self._loaded().captions, vecs, fetch, filt, "caption")
        return [np.array([int(h["entity"]["item"]) for h in hits], np.int64) for hits in found]

    def caption_count(self, allowed: Any) -> int:
        if allowed is None and not self._loaded().state.hiding:
            return min(self._loaded().state.captions, MAX_LIMIT)
        return MAX_LIMIT  # unknown without counting: the loop stops at Milvus's top-k limit

    def _fetch(self, collection: str, key: str, rows, fields: list[str], extra: str = "") -> list:
        out = []
        for start in range(0, len(rows), _CHUNK):
            part = [int(r) for r in rows[start : start + _CHUNK]]
            filt = f"{key} in {part}" + (f" and {extra}" if extra else "")
            try:
                out += self.client.query(
                    collection, filter=filt, output_fields=fields, consistency_level=READS
                )
            except Exception as e:
                raise SearchError(f"Milvus query failed: {describe(e)}") from None
        return out

    def images_of(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        got = self._fetch(self._loaded().items, "row", items, ["row", "vector", "qbnorm"])
        by_row = {int(r["row"]): r for r in got}
        missing = [int(i) for i in items if int(i) not in by_row]
        if missing:
            raise SearchError(f"Milvus lost item rows {missing[:5]} during the query: search again")
        vectors = _fp16([by_row[int(i)]["vector"] for i in items])
        norms = np.array([by_row[int(i)]["qbnorm"] for i in items], dtype=np.float32)
        return vectors.reshape(len(items), self.dim), norms

    def captions_of(self, items: np.ndarray) -> tuple[np.ndarray, ...]:
        now = self._loaded()
        got = self._fetch(
            now.captions, "item", items, ["row", "item", "vector", "qbnorm"],
            f"batch <= {now.state.committed}",
        )  # fmt: skip
        got.sort(key=lambda r: int(r["row"]))
        position = {int(i): p for p, i in enumerate(items)}
        rows = np.array([int(r["row"]) for r in got], dtype=np.int64)
        pos = np.array([position[int(r["item"])] for r in got], dtype=np.int64)
        vectors = _fp16([r["vector"] for r in got]).reshape(len(got), self.dim)
        norms = np.array([r["qbnorm"] for r in got], dtype=np.float32)
        return rows, pos, vectors, norms


class MilvusItems:
    """Item and caption records by row or id, as `retrieval.index.store.Store` gives them."""

    def __init__(self, space: MilvusSpace) -> None:
        self.space = space
        self._local = threading.local()  # this thread's prefetched records, of its snapshot

    @property
    def _items(self) -> dict[int, dict]:
        return getattr(self._local, "items", {})

    @property
    def _captions(self) -> dict[int, dict]:
        return getattr(self._local, "captions", {})

    def prefetch(self, item_rows, caption_rows) -> None:
        """Read these rows' records in one query each; lookups by them (and by their ids) then
        need no round trip until the next prefetch, in this thread."""
        fields = ["row", "id", "path", "captions", "extra", "file"]
        rows = sorted({int(r) for r in item_rows})
        self._local.items = {
            int(r["row"]): r for r in self._query("items", f"row in {rows}", fields)
        }
        caps = sorted({int(r) for r in caption_rows if r >= 0})
        got = (
            self._query("captions", f"row in {caps}", ["row", "item", "id", "text"]) if caps else []
        )
        self._local.captions = {int(r["row"]): r for r in got}

    def _query(self, which: str, filt: str, fields: list[str]) -> list[dict]:
        now = self.space._loaded()
        name = now.items if which == "items" else now.captions
        visible = now.state.reader_filter("row" if which == "items" else "item", self.space.current)
        try:
            return self.space.client.query(
                name, filter=" and ".join(f"({f})" for f in (filt, visible) if f),
                output_fields=fields,
                consistency_level=READS,
            )  # fmt: skip
        except Exception as e:
            raise SearchError(f"Milvus query failed: {describe(e)}") from None

    def item_ids(self, rows) -> list[str | None]:
        rows = [int(r) for r in rows]
        if all(r in self._items for r in rows):
            return [self._items[r]["id"] for r in rows]
        found = {
            int(r["row"]): r["id"] for r in self._query("items", f"row in {rows}", ["row", "id"])
        }
        return [found.get(r) for r in rows]

    def caption_ids(self, rows) -> list[str | None]:
        rows = [int(r) for r in rows]
        if all(r in self._captions for r in rows):
            return [self._captions[r]["id"] for r in rows]
        got = self._query("captions", f"row in {rows}", ["row", "id"])
        found = {int(r["row"]): r["id"] for r in got}
        return [found.get(r) for r in rows]

    def item(self, item_id: str) -> dict[str, Any] | None:
        fields = ["row", "id", "path", "captions", "extra", "file"]
        got = [r for r in self._items.values() if r["id"] == item_id]
        if not got:  # a lookup of its own (an HTTP request): the index as it is now
            self._local.items = {}
            self.space.refresh()
            got = self._query("items", f"id == {_literal(item_id)}", fields)
        if not got:
            return None
        r = got[0]
        captions = [{"id": c["id"], "text": c["text"]} for c in r["captions"]["all"]]
        out = {"row": int(r["row"]), "path": r["path"], "captions": captions}
        return out | {"extra": r["extra"] or {}, "file": r["file"] or None}

    def caption(self, caption_id: str) -> dict[str, Any] | None:
        got = [r for r in self._captions.values() if r["id"] == caption_id] or self._query(
            "captions", f"id == {_literal(caption_id)}", ["row", "item", "id", "text"]
        )
        if not got:
            return None
        r = got[0]
        return {"id": r["id"], "row": int(r["row"]), "item": int(r["item"]), "text": r["text"]}

    def counts(self) -> dict[str, int]:
        state = self.space._loaded().state
        return {"items": state.items, "captions": state.captions}

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a server gone: nothing left to release
            self.space.client.close()


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class RowIndex:
    """One collection of a Milvus-backed index with `VectorIndex`'s batch ``search``, for
    `bench --index` (rows: item rows for images, caption rows for captions)."""

    def __init__(self, space: MilvusSpace, kind: str) -> None:
        self.space, self.kind = space, kind

    @property
    def factory(self) -> str:
        return f"Milvus {self.space._loaded().index_types[self.kind]}"

    def search(self, queries: np.ndarray, k: int) -> list[Neighbors]:
        now = self.space._loaded()
        name = now.items if self.kind == "image" else now.captions
        filt = now.state.reader_filter(
            "row" if self.kind == "image" else "item", self.space.current
        )
        out = []
        for start in range(0, len(queries), _CHUNK):
            for q in self.space._search_many(
                name, queries[start : start + _CHUNK], k, filt, self.kind
            ):
                ids = np.array([int(h["entity"]["row"]) for h in q], dtype=np.int64)
                out.append(Neighbors(ids, np.array([h["distance"] for h in q], np.float32)))
        return out
