"""`retrieval add`, `remove` and `compact` on a Milvus-backed index: what the FAISS backend's
`retrieval.index.lifecycle` does, as Milvus inserts, deletes and compactions (O(change)).

The local folder is not rewritten: counts, fields and history live in Milvus, so every
machine reading the index sees the change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...corpus.records import Record
from ...model import spool
from ...model.encoder import Encoder
from ..config import BankConfig, BuildConfig
from ..manifest import Manifest
from . import writer
from .backend import changing


@dataclass(frozen=True)
class AddJob:
    """How `add` runs: the reading and encoding options and the command's switches."""

    config: BuildConfig
    spool_dir: Path
    skips: Any  # retrieval.index.build.Skips: the report this add fills
    upsert: bool = False
    resume: bool = False
    wait: float = 0.0


def add(
    records: list[Record], manifest: Manifest, root: Path, encoder: Encoder, job: AddJob
) -> tuple[int, int]:
    """Encode and insert ``records`` as one change. Returns (added, replaced)."""
    from ..build import entries_for  # build imports this backend lazily too: no cycle at load

    config = job.config
    with changing(manifest, root, job.wait) as v:
        present = writer.item_rows(v, [r.id for r in records])
        if not job.upsert:
            records = job.skips.skip_known(records, set(present))
        enc = spool.encode(records, encoder, job.spool_dir, config.spool_options(job.resume))
        kept = job.skips.failed(records, enc)
        replaced = [present[r.id] for r in kept if r.id in present]
        entries, _ = entries_for(kept, encoder, job.skips, v.state.next_row, v.state.next_caption)
        if entries:
            bank = BankConfig(manifest.querybank.beta, manifest.querybank.m)
            new = writer.Vectors(entries, enc.image_emb, enc.caption_emb)
            writer.add(v, new, replaced, bank)
        if job.skips.rows:
            writer.record_skips(v, job.skips.rows)
        added = len(entries) - len(replaced)
        if entries or job.skips.rows:
            skipped = sum(job.skips.counts().values())
            detail = {"added": added, "replaced": len(replaced), "skipped": skipped}
            writer.record_change(v, "add", detail)
    return added, len(replaced)


def remove(ids: list[str], manifest: Manifest, root: Path, wait: float) -> list[str]:
    """Remove items ``ids``; the ids that were in the index, in the order given."""
    with changing(manifest, root, wait) as v:
        rows = writer.item_rows(v, ids)
        present = [i for i in dict.fromkeys(ids) if i in rows]
        if present:
            writer.remove(v, [rows[i] for i in present])
            writer.record_change(v, "remove", {"removed": len(present)})
    return present


def compact(manifest: Manifest, root: Path, wait: float) -> None:
    with changing(manifest, root, wait) as v:
        writer.compact(v)
        writer.record_change(v, "compact", {})


@dataclass(frozen=True)
class Status:
    """A Milvus-backed index as `info` and `verify` describe it, read from Milvus."""

    uri: str
    collection: str  # the items collection the alias names now
    items: int
    captions: int
    index_types: dict[str, str]
    history: tuple[dict[str, Any], ...]
    skipped: int  # records skipped by changes since the build


def status(manifest: Manifest, root: Path) -> Status:
    from . import collections as coll
    from .backend import open_space
    from .client import guard

    space, items = open_space(manifest, root)
    try:
        with guard("reading the index's history"):
            now = space.refresh()
            history = coll.rows_with_prefix(space.client, space.names, f"history:{now.items}:")
        skips = coll.rows_with_prefix(space.client, space.names, f"skipped:{now.items}:")
        skipped = [row for part in skips for row in part]
        assert manifest.milvus is not None
        return Status(
            manifest.milvus.uri, now.items, now.state.items, now.state.captions,
            dict(now.index_types), tuple(history), len(skipped),
        )  # fmt: skip
    finally:
        items.close()
