"""LMDB metadata store: items, captions, and the row numbers FAISS knows them by.

External ids are the corpus's own strings. FAISS only holds int64 rows, so the store keeps both
directions: ``item id -> {row, path, captions, extra}``, ``caption id -> {row, item, text}``, and
``row -> id`` for each of the two indexes. Row numbers stay inside `retrieval.index` and the
query layer (`retrieval.query.ranking`).

Sub-databases: ``items``, ``captions``, ``image_rows``, ``caption_rows``, ``meta``, and
``image_tombstones`` / ``caption_tombstones``: rows of removed items that an index type without
removal (HNSW, IVF) still holds; searches exclude them until ``retrieval compact``.

A published store is never written again: `retrieval.index.lifecycle` copies it into the next
version (`Store.copy_to`) and changes the copy.
"""

from __future__ import annotations

import json
import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

_DBS = (
    b"items",
    b"captions",
    b"image_rows",
    b"caption_rows",
    b"meta",
    b"image_tombstones",
    b"caption_tombstones",
)
# LMDB reserves address space, not disk: the file only grows with what is written.
_MAP_SIZE = 1 << 37


def _row_key(row: int) -> bytes:
    return struct.pack(">q", row)  # big-endian, so keys sort in row order


def _dump(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class ItemEntry:
    """One indexed item as the build writes it."""

    id: str
    row: int
    path: str
    captions: tuple[tuple[str, int, str], ...] = ()  # (caption id, caption row, text)
    extra: dict[str, Any] = field(default_factory=dict)
    file: dict[str, Any] | None = None  # the image file's size, mtime and sha256 (sync)


class _Readers:
    """Read-only environments, one per store folder, shared by every reader in the process.

    py-lmdb refuses to open one environment twice in a process, and two searchers (or a
    searcher and `verify`) may well read the same version. A published store is immutable, so
    sharing is safe, and readers need no lock file (nor write access). The last reader to
    close a store closes its environment.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Path, list] = {}  # resolved folder -> [environment, readers]

    def acquire(self, path: Path) -> lmdb.Environment:
        key = path.resolve()
        with self._lock:
            if key not in self._open:
                env = lmdb.open(str(key), readonly=True, lock=False, max_dbs=len(_DBS))
                self._open[key] = [env, 0]
            self._open[key][1] += 1
            return self._open[key][0]

    def release(self, path: Path) -> None:
        key = path.resolve()
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._open[key]
                entry[0].close()


# Process-wide because the constraint it works around (one environment per file) is.
_READERS = _Readers()


class Store:
    """An LMDB environment; open with `Store.create` to write or `Store.open` to read."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self._reader: Path | None = None  # set for shared read-only environments
        readonly = env.flags()["readonly"]
        self._db = {}
        for name in _DBS:
            try:
                self._db[name.decode()] = env.open_db(name, create=not readonly)
            except lmdb.NotFoundError:  # a store written before tombstones existed
                self._db[name.decode()] = None

    @classmethod
    def create(cls, path: Path) -> Store:
        Path(path).mkdir(parents=True, exist_ok=True)
        return cls(lmdb.open(str(path), map_size=_MAP_SIZE, max_dbs=len(_DBS), sync=True))

    @classmethod
    def open(cls, path: Path) -> Store:
        if not (Path(path) / "data.mdb").is_file():
            raise FileNotFoundError(f"no metadata store at {path}")
        store = cls(_READERS.acquire(Path(path)))
        store._reader = Path(path)
        return store

    def close(self) -> None:
        if self._reader is not None:
            _READERS.release(self._reader)
            self._reader = None
        else:
            self.env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put_items(self, items: Iterable[ItemEntry]) -> None:
        """Write items, their captions and both row maps in one transaction."""
        with self.env.begin(write=True) as txn:
            for it in items:
                caps = [{"id": cid, "text": text} for cid, _, text in it.captions]
                value = {"row": it.row, "path": it.path, "captions": caps, "extra": it.extra}
                if it.file is not None:
                    value["file"] = it.file
                txn.put(it.id.encode(), _dump(value), db=self._db["items"])
                txn.put(_row_key(it.row), it.id.encode(), db=self._db["image_rows"])
                for cid, crow, text in it.captions:
                    cval = {"row": crow, "item": it.id, "text": text}
                    txn.put(cid.encode(), _dump(cval), db=self._db["captions"])
                    txn.put(_row_key(crow), cid.encode(), db=self._db["caption_rows"])

    def remove_items(self, item_ids: Iterable[str]) -> tuple[list[int], list[int]]:
        """Delete items with their captions and row maps, in one transaction.

        Returns the ``(image rows, caption rows)`` they held; unknown ids are ignored.
        """
        image_rows, caption_rows = [], []
        with self.env.begin(write=True) as txn:
            for item_id in item_ids:
                raw = txn.pop(item_id.encode(), db=self._db["items"])
                if raw is None:
                    continue
                item = json.loads(raw)
                image_rows.append(item["row"])
                txn.delete(_row_key(item["row"]), db=self._db["image_rows"])
                for cap in item["captions"]:
                    crow = json.loads(txn.pop(cap["id"].encode(), db=self._db["captions"]))["row"]
                    caption_rows.append(crow)
                    txn.delete(_row_key(crow), db=self._db["caption_rows"])
        return image_rows, caption_rows

    def add_tombstones(self, kind: str, rows: Iterable[int]) -> None:
        """Record rows of removed items (``kind`` "image") or captions that FAISS still holds."""
        with self.env.begin(write=True, db=self._db[f"{kind}_tombstones"]) as txn:
            for row in rows:
                txn.put(_row_key(int(row)), b"")

    def tombstones(self, kind: str) -> np.ndarray:
        """Sorted (T,) int64 rows of removed items (``kind`` "image") or captions still in FAISS."""
        db = self._db[f"{kind}_tombstones"]
        if db is None:
            return np.zeros(0, np.int64)
        with self.env.begin(db=db) as txn:
            rows = [struct.unpack(">q", key)[0] for key in txn.cursor().iternext(values=False)]
        return np.array(rows, dtype=np.int64)

    def rows(self, kind: str) -> np.ndarray:
        """Sorted (R,) int64 rows of the live items (``kind`` "image") or captions."""
        with self.env.begin(db=self._db[f"{kind}_rows"]) as txn:
            rows = [struct.unpack(">q", key)[0] for key in txn.cursor().iternext(values=False)]
        return np.array(rows, dtype=np.int64)

    def copy_to(self, path: Path) -> None:
        """A copy of the whole store at ``path`` (a new, empty folder).

        A plain file copy: a published store is never written, so its file is consistent, and
        a full disk surfaces as the OSError it is (LMDB's own copy reports it as EINVAL).
        """
        Path(path).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(self.env.path()) / "data.mdb", Path(path) / "data.mdb")

    def put_meta(self, key: str, value: Any) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(key.encode(), _dump(value), db=self._db["meta"])

    def _get(self, db: str, key: bytes) -> bytes | None:
        with self.env.begin(db=self._db[db]) as txn:
            return txn.get(key)

    def item(self, item_id: str) -> dict[str, Any] | None:
        """``{"id", "row", "path", "captions": [{"id", "text"}], "extra"}`` or None."""
        raw = self._get("items", item_id.encode())
        return {"id": item_id, **json.loads(raw)} if raw is not None else None

    def caption(self, caption_id: str) -> dict[str, Any] | None:
        """``{"id", "row", "item", "text"}`` or None."""
        raw = self._get("captions", caption_id.encode())
        return {"id": caption_id, **json.loads(raw)} if raw is not None else None

    def item_ids(self, rows: Iterable[int]) -> list[str | None]:
        return self._ids("image_rows", rows)

    def caption_ids(self, rows: Iterable[int]) -> list[str | None]:
        return self._ids("caption_rows", rows)

    def _ids(self, db: str, rows: Iterable[int]) -> list[str | None]:
        with self.env.begin(db=self._db[db]) as txn:
            return [
                (v.decode() if (v := txn.get(_row_key(int(r)))) is not None else None) for r in rows
            ]

    def meta(self, key: str) -> Any:
        raw = self._get("meta", key.encode())
        return json.loads(raw) if raw is not None else None

    def counts(self) -> dict[str, int]:
        """Live items and captions, and the tombstoned rows of each."""
        with self.env.begin() as txn:
            out = {name: txn.stat(self._db[name])["entries"] for name in ("items", "captions")}
            for kind in ("image", "caption"):
                db = self._db[f"{kind}_tombstones"]
                out[f"{kind}_tombstones"] = txn.stat(db)["entries"] if db is not None else 0
        return out

    def iter_items(self) -> Iterator[dict[str, Any]]:
        with self.env.begin(db=self._db["items"]) as txn:
            for key, raw in txn.cursor():
                yield {"id": key.decode(), **json.loads(raw)}
