"""Changing a published index: add items, remove them, compact tombstones away.

Each operation writes a new version from the published one and swaps it in (`layout.commit`)
under the index's writer lock. A crash at any moment leaves the old version published; readers
keep the version they opened and never wait; a second writer waits or fails. Files a change
does not touch are hard-linked; the FAISS indexes and the LMDB store are rewritten whole, which
keeps every published file immutable at O(index size) I/O per change.

Rows are never reused: added items get rows after the last one, removed rows stay in the
embedding arrays, and in FAISS too where the index type cannot delete (HNSW, IVF), as
tombstones that searches exclude. `compact` renumbers the live rows and rebuilds both FAISS
indexes from their stored vectors, without re-encoding.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..corpus.readers import read_corpus
from ..corpus.records import unique_records
from ..errors import IndexBuildError
from ..model import spool
from ..model.encoder import Encoder
from ..model.spec import ModelSpec
from . import autoindex, integrity, layout, querybank
from .build import Skips, entries_for
from .config import TARGET_RECALL, BuildConfig
from .embeddings import (
    PATCHES,
    Embeddings,
    chunks,
    load_embeddings,
    save_embeddings,
    save_patches,
)
from .manifest import INDEX_FILES, MANIFEST, Change, IndexEntry, Manifest, now, read_manifest
from .manifest import KINDS as _KINDS
from .milvus.changes import AddJob
from .store import ItemEntry, Store
from .sync import plan as sync_plan
from .vector_index import VectorIndex


@dataclass
class ChangeReport:
    name: str
    op: str
    path: Path
    added: int = 0
    replaced: int = 0
    removed: int = 0
    missing: list[str] = field(default_factory=list)  # ids asked to remove that were not there
    skipped: Counter = field(default_factory=Counter)
    tombstones: int = 0  # rows removed items still hold in FAISS
    seconds: float = 0.0
    changed: bool = True  # False: nothing to do, no new version published

    def summary(self) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in self.skipped.most_common()) or "none"
        parts = {
            "add": f"added {self.added}, replaced {self.replaced}; skipped "
            f"{sum(self.skipped.values())} ({reasons})",
            "remove": f"removed {self.removed}; not in the index: {len(self.missing)}"
            + (
                f" ({', '.join(self.missing[:5])}{', ...' if len(self.missing) > 5 else ''})"
                if self.missing
                else ""
            ),
            "compact": f"dropped {self.removed} removed rows",
            "sync": f"added {self.added}, re-encoded {self.replaced}, removed {self.removed}; "
            f"skipped {sum(self.skipped.values())} ({reasons})",
        }[self.op]
        state = "" if self.changed else " (nothing changed)"
        return (
            f"index {self.name!r}: {parts}; {self.tombstones} tombstones; "
            f"{self.seconds:.1f}s{state}; at {self.path}"
        )


def add(
    corpus: str | Path,
    name: str,
    index_dir: str | Path | None = None,
    config: BuildConfig | None = None,
    *,
    upsert: bool = False,
    encoder: Encoder | None = None,
    resume: bool = False,
    wait: float = 0.0,
    model: ModelSpec | None = None,
    sync: bool = False,
) -> ChangeReport:
    """Add ``corpus``'s records to index ``name`` with the model it was built with.

    Ids already in the index are skipped (recorded), or replaced with ``upsert``; bad records
    are skipped with their reasons as in a build. ``config``: reading and encoding options;
    ``model``: the index's model at another path (checked against the manifest), or None.
    ``sync``: bring the index in step with ``corpus`` (`retrieval.index.sync`): new and changed
    items encoded, items the corpus no longer lists removed, in the same one version.
    """
    config, start = config or BuildConfig(), time.perf_counter()
    root = layout.index_root(index_dir)
    guard = layout.disk_guard(root, f"adding to index {name!r}", "free some space and retry")
    with layout.writer_lock(root, name, wait), guard:
        current = integrity.resolve(name, root)
        integrity.check_before_change(name, current)
        manifest = read_manifest(current)
        encoder = _encoder_for(manifest, encoder, model, config)
        skips = Skips()
        records, dropped = unique_records(read_corpus(corpus, config.read))
        skips.dropped(dropped)
        if manifest.milvus is not None:
            job = AddJob(config, layout.spool_dir(root, name), skips, upsert, resume, wait)
            return _finish(_milvus_add(records, manifest, root, encoder, job, sync), start)
        with Store.open(current / layout.STORE) as old:
            gone: list[str] = []
            if sync:  # only what differs (replaced in place), and the items to drop
                records, gone = _sync_selection(records, old, f"{corpus}", name)
            present = {r.id for r in records if old.item(r.id) is not None}
        if not (upsert or sync):
            records = skips.skip_known(records, present)
        spool_dir = layout.spool_dir(root, name)
        enc = spool.encode(records, encoder, spool_dir, _spool_options(config, resume, current))
        kept = skips.failed(records, enc)
        replaced = [r.id for r in kept if r.id in present]
        op, added = "sync" if sync else "add", len(kept) - len(replaced)
        report = ChangeReport(name, op, root / name, added, len(replaced), len(gone))
        if kept or skips.rows or gone:
            change = _Addition(kept, enc, replaced, skips, encoder, config, str(corpus), gone, op)
            layout.commit(root, name, lambda folder: change.write(current, folder))
        else:
            report.changed = False
        report.skipped = skips.counts()
        spool.discard(spool_dir)
    return _finish(report, start)


def _spool_options(config: BuildConfig, resume: bool, current: Path) -> spool.SpoolOptions:
    """A version with stored patch tokens keeps them for every item it adds."""
    stored = (current / layout.EMBEDDINGS / PATCHES).is_file()
    return replace(config.spool_options(resume), patches=stored)


def _milvus_add(records, manifest: Manifest, root: Path, encoder, job, sync: bool):
    from .milvus import changes

    if sync:
        raise IndexBuildError(
            f"sync is not available on the Milvus backend yet: `retrieval add "
            f"{manifest.name} CORPUS --upsert` re-encodes what changed, `remove` drops items"
        )
    added, replaced = changes.add(records, manifest, root, encoder, job)
    report = ChangeReport(manifest.name, "add", root / manifest.name, added, replaced)
    report.skipped, report.changed = job.skips.counts(), bool(added or replaced)
    spool.discard(job.spool_dir)
    return report


def _sync_selection(records: list, store: Store, corpus: str, name: str) -> tuple[list, list]:
    """(the records that are new or changed, the ids the corpus no longer lists)."""
    if not records:  # an unmounted folder, a wrong file: never "remove everything"
        raise IndexBuildError(
            f"{corpus} lists no items: sync would remove all of index {name!r}; "
            "give the corpus it was built from (`retrieval remove` removes items)"
        )
    todo = sync_plan(records, store)
    wanted = {*todo.new, *todo.changed}
    return [r for r in records if r.id in wanted], todo.gone


@dataclass
class _Addition:
    kept: list
    enc: spool.Encoded
    replaced: list[str]
    skips: Skips
    encoder: Encoder
    config: BuildConfig
    corpus: str
    gone: list[str] = field(default_factory=list)  # sync: ids the corpus no longer lists
    op: str = "add"  # or "sync", as the history records it

    def write(self, current: Path, folder: Path) -> Manifest:
        old = load_embeddings(current)
        entries, _ = entries_for(
            self.kept, self.encoder, self.skips, len(old.image), len(old.caption)
        )
        indexes = load_indexes(current)
        copy_store(current, folder)
        with Store.create(folder / layout.STORE) as store:
            _drop(store, indexes, [*self.replaced, *self.gone])
            store.put_items(entries)
            for kind in _KINDS:
                indexes[kind].exclude(store.tombstones(kind))
        indexes["image"].add(self.enc.image_emb, np.array([e.row for e in entries]))
        caption_rows = np.array([c[1] for e in entries for c in e.captions], dtype=np.int64)
        indexes["caption"].add(self.enc.caption_emb, caption_rows)
        save_indexes(indexes, folder)
        emb = Embeddings(
            image=np.concatenate([old.image, self.enc.image_emb.astype(np.float16)]),
            caption=np.concatenate([old.caption, self.enc.caption_emb.astype(np.float16)]),
            caption_owner=np.concatenate(
                [old.caption_owner, [e.row for e in entries for _ in e.captions]]
            ).astype(np.int64),
            image_norm=old.image_norm,
            caption_norm=old.caption_norm,
        )
        _normalise_new(
            emb, indexes, current, self.config.querybank, len(old.image), len(old.caption)
        )
        save_embeddings(folder, emb, bank=_bank(current))
        if old.patches is not None:
            new = [self.enc.patches] if self.enc.patches is not None else []
            save_patches(
                folder, [*chunks(old.patches), *new], (len(emb.image), *old.patches.shape[1:])
            )
        self.skips.write(folder / layout.SKIPPED, previous=current / layout.SKIPPED)
        history = {
            "corpus": self.corpus,
            "added": len(entries) - len(self.replaced),
            "replaced": len(self.replaced),
            "skipped": sum(self.skips.counts().values()),
        } | ({"removed": len(self.gone)} if self.gone else {})
        manifest = change_manifest(current, folder, indexes, self.op, history)
        by_reason = Counter(manifest.counts.skipped_by_reason) + self.skips.counts()
        counts = replace(
            manifest.counts, skipped=sum(by_reason.values()), skipped_by_reason=dict(by_reason)
        )
        return replace(manifest, counts=counts)


def _normalise_new(emb: Embeddings, indexes, current: Path, config, first_image, first_caption):
    """Querybank normalisers of the new rows, against the build's bank or the live corpus.

    The live corpus is already indexed: its FAISS indexes (tombstones excluded) are the bank.
    Old rows keep their normalisers, computed against the bank as it was then.
    """
    new_images = unit_rows(emb.image[first_image:])
    new_captions = unit_rows(emb.caption[first_caption:])
    bank = _bank(current)
    if bank is not None:
        image_norm = querybank.normalisers(new_images, unit_rows(bank[1]), config)
        caption_norm = querybank.normalisers(new_captions, unit_rows(bank[0]), config)
    else:
        image_norm = querybank.normalisers_in(new_images, indexes["caption"], config)
        caption_norm = querybank.normalisers_in(new_captions, indexes["image"], config)
    emb.image_norm = np.concatenate([emb.image_norm, image_norm])
    emb.caption_norm = np.concatenate([emb.caption_norm, caption_norm])


def unit_rows(x: np.ndarray) -> np.ndarray:
    """fp16-stored rows back to (N, D) float32 unit vectors."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _bank(current: Path):
    folder = current / layout.EMBEDDINGS
    if not (folder / "bank.image.npy").is_file():
        return None
    return np.load(folder / "bank.image.npy"), np.load(folder / "bank.caption.npy")


def remove(
    name: str, ids: list[str], index_dir: str | Path | None = None, wait: float = 0.0
) -> ChangeReport:
    """Remove items ``ids`` (with their captions) from index ``name``."""
    start, root = time.perf_counter(), layout.index_root(index_dir)
    guard = layout.disk_guard(root, f"removing from index {name!r}", "free some space and retry")
    with layout.writer_lock(root, name, wait), guard:
        current = integrity.resolve(name, root)
        integrity.check_before_change(name, current)
        manifest = read_manifest(current)
        if manifest.milvus is not None:
            from .milvus import changes

            present = changes.remove(ids, manifest, root, wait)
            found = set(present)
            missing = list(dict.fromkeys(i for i in ids if i not in found))
            report = ChangeReport(name, "remove", root / name, removed=len(present))
            report.missing, report.changed = missing, bool(present)
            return _finish(report, start)
        with Store.open(current / layout.STORE) as old:
            present = list(dict.fromkeys(i for i in ids if old.item(i) is not None))
        found = set(present)
        missing = list(dict.fromkeys(i for i in ids if i not in found))
        report = ChangeReport(name, "remove", root / name, removed=len(present), missing=missing)
        if present:

            def fill(folder: Path) -> dict:
                indexes = load_indexes(current)
                copy_store(current, folder)
                with Store.create(folder / layout.STORE) as store:
                    _drop(store, indexes, present)
                save_indexes(indexes, folder)
                link_files(current, folder, layout.EMBEDDINGS, layout.SKIPPED)
                detail = {"removed": len(present)}
                return change_manifest(current, folder, indexes, "remove", detail)

            layout.commit(root, name, fill)
        else:
            report.changed = False
    return _finish(report, start)


def _drop(store: Store, indexes: dict[str, VectorIndex], item_ids: list[str]) -> None:
    """Remove items from ``store`` and from FAISS, or tombstone them where FAISS cannot."""
    rows = dict(zip(_KINDS, store.remove_items(item_ids), strict=True))
    for kind in _KINDS:
        if not indexes[kind].remove(np.array(rows[kind], dtype=np.int64)):
            store.add_tombstones(kind, rows[kind])


def compact(name: str, index_dir: str | Path | None = None, wait: float = 0.0) -> ChangeReport:
    """Rebuild index ``name`` without its tombstones and removed rows, from stored vectors."""
    start, root = time.perf_counter(), layout.index_root(index_dir)
    guard = layout.disk_guard(root, f"compacting index {name!r}", "free some space and retry")
    with layout.writer_lock(root, name, wait), guard:
        current = integrity.resolve(name, root)
        integrity.check_before_change(name, current)
        manifest = read_manifest(current)
        if manifest.milvus is not None:
            from .milvus import changes

            changes.compact(manifest, root, wait)
            return _finish(ChangeReport(name, "compact", root / name), start)
        old = load_embeddings(current)
        with Store.open(current / layout.STORE) as store:
            live = {kind: store.rows(kind) for kind in _KINDS}
            entries = _renumbered(store, live)
        report = ChangeReport(name, "compact", root / name)
        report.removed = len(old.image) - len(live["image"])
        if report.removed or len(old.caption) != len(live["caption"]):
            layout.commit(root, name, lambda folder: _rebuild(current, folder, live, entries, old))
        else:
            report.changed = False
    return _finish(report, start)


def _renumbered(store: Store, live: dict[str, np.ndarray]) -> list[ItemEntry]:
    """Every live item with rows renumbered 0.. in the order of their old rows."""
    entries = []
    for it in store.iter_items():
        caps = tuple(
            (
                c["id"],
                int(np.searchsorted(live["caption"], store.caption(c["id"])["row"])),
                c["text"],
            )
            for c in it["captions"]
        )
        row = int(np.searchsorted(live["image"], it["row"]))
        entries.append(ItemEntry(it["id"], row, it["path"], caps, it["extra"], it.get("file")))
    return entries


def _rebuild(current: Path, folder: Path, live, entries, old: Embeddings) -> Manifest:
    manifest = read_manifest(current)
    indexes = load_indexes(current)
    vectors = {
        kind: _stored_vectors(
            indexes[kind],
            live[kind],
            old.image if kind == "image" else old.caption,
            manifest.indexes[kind],
        )
        for kind in _KINDS
    }
    train = autoindex.training_sample(vectors["image"], vectors["caption"])
    rebuilt, searches = {}, {}
    for kind, other in (("image", "caption"), ("caption", "image")):
        factory = manifest.indexes[kind].factory if len(vectors[kind]) else "Flat"
        rebuilt[kind] = VectorIndex.build(
            vectors[kind], np.arange(len(vectors[kind])), factory, train=train
        )
        tuned = manifest.indexes[kind].search
        target = tuned.target if tuned else TARGET_RECALL
        searches[kind] = autoindex.tune(rebuilt[kind], vectors[kind], vectors[other], target)
    save_indexes(rebuilt, folder)
    owner = np.empty(len(live["caption"]), np.int64)
    for e in entries:
        owner[[c[1] for c in e.captions]] = e.row
    emb = Embeddings(
        image=old.image[live["image"]],
        caption=old.caption[live["caption"]],
        caption_owner=owner,
        image_norm=old.image_norm[live["image"]],
        caption_norm=old.caption_norm[live["caption"]],
    )
    save_embeddings(folder, emb, bank=_bank(current))
    if old.patches is not None:
        shape = (len(live["image"]), *old.patches.shape[1:])
        save_patches(folder, chunks(old.patches, live["image"]), shape)
    with Store.create(folder / layout.STORE) as store:
        store.put_items(sorted(entries, key=lambda e: e.row))
    link_files(current, folder, layout.SKIPPED)
    out = change_manifest(
        current, folder, rebuilt, "compact", {"dropped": len(old.image) - len(live["image"])}
    )
    tuned = {kind: replace(out.indexes[kind], search=searches[kind]) for kind in _KINDS}
    return replace(out, indexes=tuned)


def _stored_vectors(index: VectorIndex, rows, stored, entry: IndexEntry) -> np.ndarray:
    """(R, D) float32 vectors of ``rows``: FAISS's own copy when it is exact, else fp16 rows."""
    if not autoindex.compressed(entry.factory):
        return index.vectors(rows)
    return unit_rows(stored[rows])


def load_indexes(folder: Path) -> dict[str, VectorIndex]:
    entries = read_manifest(folder).indexes
    return {
        kind: autoindex.apply(VectorIndex.load(folder / e.file, e.factory), e)
        for kind, e in entries.items()
    }


def save_indexes(indexes: dict[str, VectorIndex], folder: Path) -> None:
    for kind in _KINDS:
        indexes[kind].save(folder / INDEX_FILES[kind])


def copy_store(current: Path, folder: Path) -> None:
    with Store.open(current / layout.STORE) as old:
        old.copy_to(folder / layout.STORE)


def link_files(current: Path, folder: Path, *names: str) -> None:
    """Share files a change leaves alone with the previous version (hard links)."""
    for name in names:
        src = current / name
        if src.is_dir():
            (folder / name).mkdir()
            for f in src.iterdir():
                layout.link_or_copy(f, folder / name / f.name)
        elif src.exists():
            layout.link_or_copy(src, folder / name)


def change_manifest(current: Path, folder: Path, indexes, op: str, detail: dict) -> Manifest:
    """The previous manifest with this version's counts, and the change appended to history."""
    manifest = read_manifest(current)
    with Store.open(folder / layout.STORE) as store:
        counts = store.counts()
    entries = {
        kind: replace(e, count=indexes[kind].ntotal, factory=indexes[kind].factory)
        for kind, e in manifest.indexes.items()
    }
    stamp = now()
    return replace(
        manifest,
        indexes=entries,
        counts=replace(
            manifest.counts,
            items=counts["items"],
            captions=counts["captions"],
            tombstones={kind: counts[f"{kind}_tombstones"] for kind in _KINDS},
        ),
        updated=stamp,
        history=(*manifest.history, Change(op, stamp, detail)),
        sha256={},
    )


def _encoder_for(
    manifest: Manifest, encoder: Encoder | None, model: ModelSpec | None, config: BuildConfig
) -> Encoder:
    """The index's model (``model``: at another path) run by the asked or the index's runtime,
    or ``encoder`` once checked to be that model; at the index's precision."""
    if encoder is None:
        runtime = config.runtime.over(manifest.runtime)
        encoder = Encoder.load(manifest.spec_for(model), config.device, runtime)
    else:
        manifest.check_model(encoder.spec)
    manifest.check_runtime(encoder.runtime, config.runtime.given)
    return encoder


def _finish(report: ChangeReport, start: float) -> ChangeReport:
    report.seconds = time.perf_counter() - start
    folder = report.path.resolve() if report.path.exists() else report.path
    if (folder / MANIFEST).is_file():
        report.tombstones = read_manifest(folder).counts.tombstones.get("image", 0)
    return report
