"""Every write to a Milvus-backed index: build a version, add, remove, upsert, compact.

Each change is O(change): rows are inserted and deleted, never rewritten. Readers never see
half of one, because each change goes through the version's state row (`collections.State`):

- **add** (and an upsert's new rows): ``pending = {"op": "add", "batch": b}`` is written
  first, then the rows are inserted with ``batch = b``, invisible (readers filter
  ``batch <= committed``); one state write then commits ``b``. A crash before it leaves rows
  that the next writer deletes (rolled back), so a re-run inserts the same rows again.
- **remove** (and an upsert's old rows): one state write hides the rows (``hiding``), which
  is the moment they disappear for readers; they are deleted two staleness windows later
  (`purge`), by this change or the next.

Every change runs under the index's lock (`retrieval.index.milvus.lock`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ...scoring.fusion import bank_normalisers
from ..config import BankConfig
from ..store import ItemEntry
from . import collections as coll
from .client import MilvusError, guard
from .where import filter_doc

log = logging.getLogger(__name__)

INSERT_ROWS = 1_000  # rows per insert call (a gRPC message stays far below its size limit)
HIDE_AT_ONCE = 4_000  # rows one change may hide: the state row stays under Milvus's 64 KiB JSON


@dataclass(frozen=True)
class Vectors:
    """New rows to write: entries with their (N, D) image and (C, D) caption unit vectors."""

    entries: Sequence[ItemEntry]
    images: np.ndarray
    captions: np.ndarray


# --- rows -----------------------------------------------------------------------------------


def _item_rows(new: Vectors, image_norm, batch: int) -> list[dict[str, Any]]:
    return [
        {
            "row": e.row, "id": e.id, "path": e.path,
            "captions": {"all": [{"id": c[0], "text": c[2], "row": c[1]} for c in e.captions]},
            "extra": e.extra, "filters": filter_doc(e.extra), "file": e.file or {},
            "batch": batch, "qbnorm": float(image_norm[i]), "vector": new.images[i].tolist(),
        }
        for i, e in enumerate(new.entries)
    ]  # fmt: skip


def _caption_rows(new: Vectors, caption_norm, batch: int) -> list[dict[str, Any]]:
    out = []
    for e in new.entries:
        doc = filter_doc(e.extra)
        for cid, row, text in e.captions:
            j = len(out)
            out.append(
                {
                    "row": row, "item": e.row, "id": cid, "text": text, "filters": doc,
                    "batch": batch, "qbnorm": float(caption_norm[j]),
                    "vector": new.captions[j].tolist(),
                }
            )  # fmt: skip
    return out


def _insert(client, collection: str, rows: list[dict]) -> None:
    for start in range(0, len(rows), INSERT_ROWS):
        client.insert(collection, rows[start : start + INSERT_ROWS])


# --- a build --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    """A version being built: its items collection and the index type of each kind."""

    items: str
    index_types: dict[str, str]


@dataclass(frozen=True)
class Publish:
    """How a finished version is published: whose vectors (`collections.model_key`) and how
    long readers' views may lag (0 on milvus-lite)."""

    model: str
    grace_s: float = 0.0


def build_version(
    client, names: coll.Names, new: Vectors, norms: tuple[np.ndarray, np.ndarray], how: tuple
) -> Build:
    """Write a new version's collections, switch the aliases to it, drop the old ones.
    ``how``: (the Milvus index type asked for, a `Publish`)."""
    index, publish = how
    counts = (len(new.images), len(new.captions))
    target = create_version(client, names, new.images.shape[1], counts, index)
    insert_share(client, names, target, new, norms)
    finish_version(client, names, target, (new.entries, len(new.captions)), publish)
    return target


def create_version(
    client, names: coll.Names, dim: int, counts: tuple[int, int], index: str
) -> Build:
    """The empty collections of the next version (``counts``: items and captions, for the
    index choice), loading while rows are written; nothing reads them before `finish_version`."""
    with guard("creating the new collections"):
        coll.create_meta(client, names)
        done = coll.versions(client, names)
        version = names.version_of(done[-1]) + 1 if done else 1
        items = names.items(version)
        chosen = {}
        for name, schema, count, kind in (
            (items, coll.item_schema(client, dim), counts[0], "image"),
            (names.captions_of(items), coll.caption_schema(client, dim), counts[1], "caption"),
        ):
            if client.has_collection(name):  # left by a build that died: not published
                client.drop_collection(name)
            params, chosen[kind] = coll.index_params(client, index, count)
            coll.create_loading(client, name, schema, params)
    return Build(items, chosen)


def insert_share(client, names: coll.Names, target: Build, new: Vectors, norms) -> None:
    """Insert rows into a version being built (all of them, or one torchrun rank's share)."""
    with guard("writing the new collections"):
        _insert(client, target.items, _item_rows(new, norms[0], 0))
        _insert(client, names.captions_of(target.items), _caption_rows(new, norms[1], 0))


def finish_version(
    client, names: coll.Names, target: Build, rows: tuple[Sequence, int], publish: Publish
) -> None:
    """Record the state (``rows``: every item entry, and the caption count), wait until no
    reader's view can miss a row, switch the aliases to the new version, and drop every
    version but it and the one readers used until now (the way back)."""
    _ready(client, names, target, rows, publish)
    with guard("switching the aliases to the new version"):
        before = coll.current(client, names)
        coll.switch(client, names, target.items)
    with guard("dropping old versions"):
        for old in coll.versions(client, names):
            if old not in (target.items, before):
                client.drop_collection(names.captions_of(old))
                client.drop_collection(old)
                for key in coll.keys_of(client, names, old):
                    coll.delete_row(client, names, key)


def _ready(
    client, names: coll.Names, target: Build, rows: tuple[Sequence, int], publish: Publish
) -> None:
    """Write the new version's state row (after all of its rows), then flush and load its
    collections while the staleness window after that write runs out: once this returns, a
    reader that finds the version finds its state and every row, and searches it loaded."""
    entries, captions = rows
    collections = (target.items, names.captions_of(target.items))
    with guard("writing the new collections"):
        state = coll.State(
            next_row=len(entries), next_caption=captions, items=len(entries), captions=captions,
            model=publish.model,
        ).with_fields({k for e in entries for k in e.extra})  # fmt: skip
        coll.write_state(client, names, target.items, state)
        written = time.monotonic()
        for name in collections:
            client.flush(name)  # sealed segments get their vector index built
        coll.ensure_loaded(client, *collections)  # started by `create_version`
    time.sleep(max(0.0, publish.grace_s - (time.monotonic() - written)))


# --- changes --------------------------------------------------------------------------------


@dataclass
class Version:
    """The version a change applies to, with its state as the change goes on. ``grace_s``:
    how stale a reader's view may be (Milvus's bounded staleness; 0 for milvus-lite)."""

    client: Any
    names: coll.Names
    items: str
    state: coll.State
    grace_s: float = 0.0

    @property
    def captions(self) -> str:
        return self.names.captions_of(self.items)

    def save(self, state: coll.State) -> None:
        coll.write_state(self.client, self.names, self.items, state)
        self.state = state


def open_version(client, names: coll.Names, grace_s: float) -> Version:
    """The current version, with any change a dead writer left rolled back, and the rows
    hidden long enough ago deleted."""
    with guard("reading the index state"):
        items = coll.current(client, names)
        if items is None:
            raise MilvusError(f"Milvus has no index {names.items_alias}: build it first")
        coll.ensure_loaded(client, names.meta, items, names.captions_of(items))
        state = coll.read_state(client, names, items, strong=True)
        version = Version(client, names, items, state, grace_s)
        _recover(version)
        purge(version)
    return version


def _check_unchanged(v: Version) -> None:
    """Refuse to commit over another writer's change (a lock lost to a stalled heartbeat, or
    taken by two writers at once): the state must be as this change found it."""
    now = coll.read_state(v.client, v.names, v.items, strong=True)
    if (now.committed, now.next_row, now.hiding) != (
        v.state.committed, v.state.next_row, v.state.hiding,
    ):  # fmt: skip
        raise MilvusError(
            f"another writer changed {v.items} during this change; nothing of this change is "
            "visible: run it again"
        )


def _recover(v: Version) -> None:
    pending = v.state.pending
    if pending is None:
        return
    log.warning("rolling back an add to %s that did not finish", v.items)
    for name in (v.items, v.captions):  # never committed: its rows go
        v.client.delete(name, filter=f"batch == {pending['batch']}")
    v.save(replace(v.state, pending=None))


def item_rows(v: Version, ids: Sequence[str]) -> dict[str, int]:
    """The visible rows of ``ids`` that are in the index: id -> row."""
    found: dict[str, int] = {}
    ids = list(dict.fromkeys(ids))
    visible = v.state.reader_filter("row", current=v.grace_s == 0)  # milvus-lite: current
    for start in range(0, len(ids), 1_000):
        part = json.dumps(ids[start : start + 1_000], ensure_ascii=False)
        rows = v.client.query(
            v.items, filter=" and ".join(f for f in (f"id in {part}", visible) if f),
            output_fields=["row", "id"], consistency_level="Strong",
        )  # fmt: skip
        found |= {r["id"]: int(r["row"]) for r in rows}
    return found


def add(v: Version, new: Vectors, replaces: Sequence[int], bank: BankConfig) -> None:
    """Insert ``new`` rows (replacing items at rows ``replaces``) as one change.

    Readers read with bounded staleness, so the rows are committed only once they are older
    than ``grace_s``: a reader that sees the commit sees every row of it.
    """
    if len(replaces) > HIDE_AT_ONCE:
        raise MilvusError(
            f"one add replaces at most {HIDE_AT_ONCE:,} items on Milvus (this one "
            f"{len(replaces):,}): give the corpus in parts"
        )
    if len(v.state.hiding) + len(replaces) > HIDE_AT_ONCE:
        purge(v, wait=True)
    batch = v.state.committed + 1
    with guard("adding items"):
        v.save(replace(v.state, pending={"op": "add", "batch": batch}))
        norms = _normalisers(v, new, replaces, bank)
        _insert(v.client, v.items, _item_rows(new, norms[0], batch))
        _insert(v.client, v.captions, _caption_rows(new, norms[1], batch))
        time.sleep(v.grace_s)
        _check_unchanged(v)
        state = _hidden(v, v.state.with_fields({k for e in new.entries for k in e.extra}), replaces)
        v.save(
            replace(
                state,
                committed=batch,
                next_row=v.state.next_row + len(new.entries),
                next_caption=v.state.next_caption + len(new.captions),
                items=state.items + len(new.entries),
                captions=state.captions + len(new.captions),
                pending=None,
            )
        )  # the moment the new rows appear (and the replaced ones disappear)
        purge(v)


def remove(v: Version, rows: Sequence[int]) -> None:
    """Remove items at ``rows`` with their captions: hidden in one state write (the moment
    they disappear), deleted once no reader's view can predate that (see `purge`). More than
    `HIDE_AT_ONCE` rows go in parts, each all or nothing."""
    for start in range(0, len(rows), HIDE_AT_ONCE):
        part = rows[start : start + HIDE_AT_ONCE]
        with guard("removing items"):
            if len(v.state.hiding) + len(part) > HIDE_AT_ONCE:
                purge(v, wait=True)
            _check_unchanged(v)
            v.save(_hidden(v, v.state, part))
            purge(v)


def _hidden(v: Version, state: coll.State, rows: Sequence[int]) -> coll.State:
    """``state`` with items ``rows`` hidden, and no longer counted."""
    if not rows:
        return state
    captions = 0
    for start in range(0, len(rows), 1_000):  # each item row lists its captions
        part = [int(r) for r in rows[start : start + 1_000]]
        got = v.client.query(
            v.items, filter=f"row in {part}", output_fields=["captions"],
            consistency_level="Strong",
        )  # fmt: skip
        captions += sum(len(r["captions"]["all"]) for r in got)
    return replace(
        state,
        hiding=tuple(sorted({*state.hiding, *rows})),
        hidden_at=time.time(),
        items=state.items - len(rows),
        captions=state.captions - captions,
    )


def purge(v: Version, wait: bool = False) -> None:
    """Delete the hidden rows once a reader's view cannot predate their hiding: two staleness
    windows after it (a reader may read the state, then the rows, each that stale).
    ``wait``: wait for that moment rather than leave them to the next change."""
    if not v.state.hiding:
        return
    due = v.state.hidden_at + 2 * v.grace_s - time.time()
    if due > 0 and not wait:
        return
    time.sleep(max(due, 0.0))
    rows = list(v.state.hiding)
    with guard("deleting removed rows"):
        for start in range(0, len(rows), 1_000):
            part = rows[start : start + 1_000]
            got = v.client.query(v.items, filter=f"row in {part}", output_fields=["captions"])
            captions = [c["row"] for r in got for c in r["captions"]["all"]]
            if captions:  # by primary key: no scan of the captions collection
                v.client.delete(v.captions, filter=f"row in {captions}")
            v.client.delete(v.items, filter=f"row in {part}")
        v.save(replace(v.state, hiding=()))


def compact(v: Version) -> None:
    """Delete every hidden row (waiting out the staleness window), then Milvus's own
    compaction: deleted rows' space reclaimed, segments merged."""
    purge(v, wait=True)
    with guard("compacting"):
        for name in (v.items, v.captions):
            v.client.compact(name)


def _normalisers(v: Version, new: Vectors, replaces, bank: BankConfig):
    """Querybank normalisers of the new rows against the live corpus, the new rows included
    and the replaced ones not (as the FAISS backend computes them)."""
    hide = f" and item not in {list(replaces)}" if replaces else ""
    hide_items = f" and row not in {list(replaces)}" if replaces else ""
    image_norm = _against(v, v.captions, new.images, new.captions, bank, hide)
    caption_norm = _against(v, v.items, new.captions, new.images, bank, hide_items)
    return image_norm, caption_norm


def _against(v: Version, bank_name: str, queries, new_bank, bank: BankConfig, hide: str):
    """(Q,) normalisers of ``queries`` against the visible rows of ``bank_name`` + ``new_bank``."""
    if len(queries) == 0:
        return np.zeros(0, dtype=np.float32)
    m = bank.m
    found = v.client.search(
        bank_name, data=queries.tolist(), limit=m,
        filter=v.state.visible("item" if bank_name == v.captions else "row") + hide,
        consistency_level="Strong",
    )  # fmt: skip
    sims = np.full((len(queries), m), -np.inf)
    for i, hits in enumerate(found):
        old = np.array([h["distance"] for h in hits], dtype=np.float64)
        mine = (new_bank @ queries[i]).astype(np.float64) if len(new_bank) else np.zeros(0)
        both = np.sort(np.concatenate([old, mine]))[::-1][:m]
        sims[i, : len(both)] = both
    live = min(m, int(np.isfinite(sims).sum(axis=1).max(initial=0)))
    if live == 0:
        return np.zeros(len(queries), dtype=np.float32)
    return bank_normalisers(sims[:, :live], bank.beta).astype(np.float32)


SKIPS_PER_ROW = 200  # skip records per meta row: well under Milvus's 64 KiB JSON limit


def record_skips(v: Version, rows: list[dict]) -> None:
    """A change's skipped records, kept in Milvus beside the version (the FAISS backend
    appends them to the new version's ``skipped.jsonl``), a few hundred per meta row."""
    stamp = time.time_ns()
    with guard("recording skipped records"):
        for n, start in enumerate(range(0, len(rows), SKIPS_PER_ROW)):
            key = f"skipped:{v.items}:{stamp:020d}:{n:06d}"
            coll.write_row(v.client, v.names, key, rows[start : start + SKIPS_PER_ROW])


def record_change(v: Version, op: str, detail: dict[str, Any]) -> None:
    """The change in the version's history row (what `info` lists; the FAISS backend keeps
    it in the manifest, which a Milvus change does not rewrite)."""
    with guard("recording the change"):
        key = f"history:{v.items}:{time.time_ns():020d}"
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        coll.write_row(v.client, v.names, key, {"op": op, "at": at, **detail})
