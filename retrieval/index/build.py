"""`retrieval build`: corpus -> checked records -> embeddings -> FAISS + LMDB -> published folder.

Bad records never stop a build and never vanish: each one is written with its reason to
``skipped.jsonl`` in the index folder, and the report counts them by reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..corpus.readers import read_corpus
from ..corpus.records import Record, unique_records
from ..errors import IndexBuildError, IndexBusyError
from ..files import fingerprint
from ..model import spool
from ..model.distributed import World, barrier, from_rank0
from ..model.distributed import join as join_world
from ..model.encoder import Encoder
from . import autoindex, layout, querybank
from .config import BuildConfig
from .embeddings import Embeddings, save_embeddings, save_patches
from .manifest import Counts, IndexEntry, Manifest, QuerybankSettings
from .store import ItemEntry, Store

log = logging.getLogger(__name__)

_RESUME_HINT = "free some space and re-run with --resume to keep what was already encoded"


@dataclass
class BuildReport:
    name: str
    path: Path
    items: int
    captions: int
    skipped: Counter
    truncated: int
    seconds: float
    factories: dict[str, str]
    resumed_shards: int = 0  # spooled shards re-used from an interrupted run
    processes: int = 1  # torchrun processes that shared the encoding

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in self.skipped.most_common()) or "none"
        return (
            f"index {self.name!r}: {self.items} images and {self.captions} captions encoded in "
            f"{self.seconds:.1f}s; skipped {skipped} ({reasons}); "
            f"{self.truncated} captions truncated to the context length; "
            f"indexes {self.factories['image']} (images), {self.factories['caption']} "
            f"(captions); at {self.path}"
            + (f"; resumed {self.resumed_shards} spooled shards" if self.resumed_shards else "")
            + (f"; encoded by {self.processes} processes" if self.processes > 1 else "")
        )


@dataclass
class Skips:
    """The skip report as it grows: one JSON object per skipped record or caption."""

    rows: list[dict] = field(default_factory=list)

    def add(self, kind: str, id_: str, reason: str, **detail) -> None:
        self.rows.append({"kind": kind, "id": id_, "reason": reason, **detail})

    def dropped(self, dropped: list[tuple[str, str, str]]) -> None:
        for id_, path, reason in dropped:
            self.add("item", id_, reason, **({"path": path} if path else {}))

    def failed(self, records: list[Record], enc: spool.Encoded) -> list[Record]:
        """Record the images that did not decode; the records that did, in order."""
        for pos, reason in sorted(enc.failures.items()):
            self.add("item", records[pos].id, reason, path=str(records[pos].image))
        return [records[p] for p in enc.positions]

    def skip_known(self, records: list[Record], present: set[str]) -> list[Record]:
        """The records whose ids are not indexed yet; the others recorded as skipped."""
        for r in records:
            if r.id in present:
                self.add("item", r.id, "id already in the index (use --upsert to replace)")
        return [r for r in records if r.id not in present]

    def counts(self) -> Counter:
        return Counter(r["reason"] for r in self.rows if r["kind"] != "truncated caption")

    def truncated(self) -> int:
        return sum(1 for r in self.rows if r["kind"] == "truncated caption")

    def write(self, path: Path, previous: Path | None = None) -> None:
        """``skipped.jsonl``: the previous version's lines (if any), then this run's."""
        with path.open("w", encoding="utf-8") as f:
            if previous is not None and previous.is_file():
                f.write(previous.read_text(encoding="utf-8"))
            for row in self.rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _usable(skips: Skips, records, enc, total: int, corpus) -> list:
    """The records whose image encoded; an error when none did (nothing to index)."""
    kept = skips.failed(records, enc)
    if not kept:
        raise IndexBuildError(
            f"nothing to index: all {total} records of {corpus} were skipped "
            f"({_reasons(skips.counts())})"
        )
    return kept


def build(
    corpus: str | Path,
    name: str,
    config: BuildConfig | None = None,
    index_dir: str | Path | None = None,
    encoder: Encoder | None = None,
    resume: bool = False,
    wait: float = 0.0,
) -> BuildReport | None:
    """Build index ``name`` from ``corpus`` and publish it atomically under ``index_dir``.

    Embeddings are spooled as they are encoded: ``resume`` re-uses what an interrupted build of
    the same corpus spooled. ``wait``: seconds to wait for another writer of ``name``. Under
    torchrun, every process encodes its share of the shards, then rank 0 builds the index from
    all of them and publishes it; the other ranks return None.
    """
    config = config or BuildConfig()
    start = time.perf_counter()
    root = layout.index_root(index_dir)
    _check_backend(config)  # before any encoding
    world, device = join_world(config.device)
    with (
        _rank0_lock(root, name, wait, world),
        layout.disk_guard(root, f"building index {name!r}", _RESUME_HINT),
    ):
        skips = Skips()
        records, dropped = unique_records(read_corpus(corpus, config.read))
        skips.dropped(dropped)
        encoder = encoder or Encoder.load(config.model, device, config.runtime.over())
        spool_dir = layout.spool_dir(root, name)
        to = _destination(root, name, config, encoder, wait) if config.backend == "milvus" else None
        if _ranks_insert(config, world):
            job = _RankJob(corpus, to, world, start, resume)
            return _milvus_ranks(job, records, skips, encoder, len(dropped))
        enc = _encode(records, encoder, spool_dir, config.spool_options(resume), world)
        if enc is None:  # a torchrun rank other than 0: its share is spooled
            return None
        kept = _usable(skips, records, enc, len(records) + len(dropped), corpus)
        entries, texts = entries_for(kept, encoder, skips)

        factories: dict[str, str] = {}

        def fill(folder: Path) -> Manifest:
            where, described = _write_version(folder, entries, enc, encoder, (config, to))
            factories.update({kind: d.factory for kind, d in described.items()})
            skips.write(folder / layout.SKIPPED)
            manifest = _manifest(name, corpus, encoder, skips, described, config)
            built = round(time.perf_counter() - start, 3)
            return replace(manifest, build_seconds=built, milvus=where)

        link = layout.commit(root, name, fill)
        spool.discard(spool_dir)
    return BuildReport(
        name, link, len(entries), len(texts), skips.counts(), skips.truncated(),
        time.perf_counter() - start, factories, enc.reused if world.size == 1 else 0, world.size,
    )  # fmt: skip


def _check_backend(config: BuildConfig) -> None:
    if config.backend == "milvus":
        from .milvus.backend import check_config

        check_config(config)


def _write_version(folder: Path, entries, enc, encoder, how: tuple) -> tuple:
    """Write the version's index (``how``: the build's config, and its Milvus destination or
    None); (the Milvus location or None, the manifest's index entries)."""
    config, to = how
    if to is not None:
        return _write_milvus(to, entries, enc)
    described = _write(folder, entries, enc.image_emb, enc.caption_emb, config, encoder)
    if enc.patches is not None:
        save_patches(folder, [enc.patches], enc.patches.shape)
    return None, described


@contextlib.contextmanager
def _rank0_lock(root: Path, name: str, wait: float, world: World):
    """The writer lock, taken by rank 0 only; every rank fails if rank 0 cannot take it."""
    if world.size == 1:
        with layout.writer_lock(root, name, wait):
            yield
        return
    with contextlib.ExitStack() as stack:
        error = None
        if world.rank == 0:
            try:
                stack.enter_context(layout.writer_lock(root, name, wait))
            except IndexBusyError as e:
                error = str(e)
        error = from_rank0(world, error)
        if error:
            raise IndexBusyError(error)
        yield


def _encode(
    records, encoder, spool_dir: Path, options: spool.SpoolOptions, world: World
) -> spool.Encoded | None:
    """Encode through the spool; under torchrun each rank spools shards rank, rank + size, ...
    and, once every shard is there, rank 0 reads them all back (the others get None)."""
    if world.size == 1:
        return spool.encode(records, encoder, spool_dir, options)
    if world.rank == 0:
        spool.prepare(spool_dir, encoder, options)
    barrier(world)
    share = replace(options, progress=options.progress and world.rank == 0)
    spool.encode(records, encoder, spool_dir, share, part=(world.rank, world.size))
    barrier(world)
    if world.rank != 0:
        return None
    return spool.encode(records, encoder, spool_dir, replace(options, resume=True))


def entries_for(
    kept: list[Record], encoder: Encoder, skips: Skips, first_row: int = 0, first_caption: int = 0
) -> tuple[list[ItemEntry], list[str]]:
    """Assign rows from ``first_row`` / ``first_caption`` on, in order; drop empty captions.

    The caption texts come out in `spool.caption_texts` order, the order they were encoded in.
    """
    entries, texts = [], []
    for row, r in enumerate(kept, first_row):
        caps = []
        for i, text in enumerate(r.captions):
            cid = f"{r.id}#{i}"
            if not text:
                skips.add("caption", cid, "empty caption", item=r.id)
                continue
            caps.append((cid, first_caption + len(texts), text))
            texts.append(text)
        entries.append(
            ItemEntry(r.id, row, str(r.image), tuple(caps), r.extra, fingerprint(r.image))
        )
    for (cid, _, text), long in zip(
        (c for e in entries for c in e.captions), encoder.too_long(texts), strict=True
    ):
        if long:
            skips.add(
                "truncated caption",
                cid,
                "caption longer than the context length",
                chars=len(text),
                context_length=encoder.context_length,
            )
    return entries, texts


def _write(
    folder: Path, entries, emb, cap_emb, config: BuildConfig, encoder
) -> dict[str, IndexEntry]:
    device = "cuda" if encoder.device.type == "cuda" else "cpu"
    indexes, described = autoindex.build_pair(
        emb, cap_emb, config.index, config.max_memory, config.target_recall, device
    )
    for kind, entry in described.items():
        indexes[kind].save(folder / entry.file)
    bank_images, bank_text = emb, cap_emb
    if config.bank is not None:
        bank_images, bank_text = querybank.encode_bank(config.bank, encoder, config.read)
    owner = np.array([e.row for e in entries for _ in e.captions], dtype=np.int64)
    save_embeddings(
        folder,
        Embeddings(
            image=emb,
            caption=cap_emb,
            caption_owner=owner,
            image_norm=querybank.normalisers(emb, bank_text, config.querybank),
            caption_norm=querybank.normalisers(cap_emb, bank_images, config.querybank),
        ),
        bank=(bank_images, bank_text) if config.bank is not None else None,
    )
    with Store.create(folder / layout.STORE) as store:
        store.put_items(entries)
    return described


def _ranks_insert(config: BuildConfig, world: World) -> bool:
    """Whether each torchrun rank writes its own rows: into a Milvus server, yes; milvus-lite
    serves one process, so there rank 0 writes every row as for FAISS."""
    if config.backend != "milvus" or world.size == 1:
        return False
    from .milvus.client import is_lite

    return not is_lite(config.milvus_uri or ".db")


@dataclass(frozen=True)
class _RankJob:
    corpus: Path
    to: Any  # retrieval.index.milvus.backend.Destination (imported only with Milvus)
    world: World
    start: float
    resume: bool


def _milvus_ranks(job: _RankJob, records, skips: Skips, encoder, dropped: int):
    """A distributed build into a Milvus server: rank 0 creates the version's collections,
    every rank encodes its shards and inserts their rows, rank 0 then finishes the version
    (flush, state, aliases) and publishes the manifest. The other ranks return None."""
    from .milvus import backend

    world, config, root, name = job.world, job.to.config, job.to.root, job.to.name
    spool_dir = layout.spool_dir(root, name)
    options = config.spool_options(job.resume)
    with backend.rank_build(job.to, world.rank == 0) as target:
        if world.rank == 0:
            spool.prepare(spool_dir, encoder, options)
            target.create(encoder.dim, (len(records), sum(len(r.captions) for r in records)))
        target.share(from_rank0(world, target.created))
        share = replace(options, progress=options.progress and world.rank == 0)
        spool.encode(records, encoder, spool_dir, share, part=(world.rank, world.size))
        barrier(world)  # every shard spooled: each rank reads them all for rows and the bank
        enc = spool.encode(
            records, encoder, spool_dir, replace(options, resume=True, progress=False)
        )
        kept = _usable(skips, records, enc, len(records) + dropped, job.corpus)
        entries, texts = entries_for(kept, encoder, skips)
        mine = spool.ranks_of(enc.positions, options, world.size) == world.rank
        target.insert(entries, enc, mine, config.querybank)
        barrier(world)
        if world.rank != 0:
            return None
        target.finish(entries, len(texts))

        def fill(folder: Path) -> Manifest:
            skips.write(folder / layout.SKIPPED)
            described = target.described(len(entries), len(texts))
            manifest = _manifest(name, job.corpus, encoder, skips, described, config)
            built = round(time.perf_counter() - job.start, 3)
            return replace(manifest, build_seconds=built, milvus=target.where)

        link = layout.commit(root, name, fill)
    spool.discard(spool_dir)
    factories = {kind: d.factory for kind, d in target.described(1, 1).items()}
    return BuildReport(
        name, link, len(entries), len(texts), skips.counts(), skips.truncated(),
        time.perf_counter() - job.start, factories, 0, world.size,
    )  # fmt: skip


def _destination(root: Path, name: str, config: BuildConfig, encoder, wait: float):
    from .milvus.backend import Destination
    from .milvus.collections import model_key

    identity = encoder.spec.identity()
    model = model_key(
        identity.model, identity.pretrained, identity.checkpoint_sha256, identity.random_init
    )
    return Destination(root, name, config, model, wait)


def _write_milvus(to, entries, enc):
    """The Milvus backend's build: normalisers as the FAISS backend's, rows into Milvus."""
    from .milvus.backend import write_build
    from .milvus.writer import Vectors

    bank = to.config.querybank
    norms = (
        querybank.normalisers(enc.image_emb, enc.caption_emb, bank),
        querybank.normalisers(enc.caption_emb, enc.image_emb, bank),
    )
    return write_build(to, Vectors(entries, enc.image_emb, enc.caption_emb), norms)


def _manifest(
    name: str, corpus, encoder: Encoder, skips: Skips, indexes: dict[str, IndexEntry], config
) -> Manifest:
    return Manifest.new(
        name,
        encoder.spec.identity(),
        dim=encoder.dim,
        context_length=encoder.context_length,
        indexes=indexes,
        counts=Counts(
            items=indexes["image"].count,
            captions=indexes["caption"].count,
            skipped=sum(skips.counts().values()),
            skipped_by_reason=dict(skips.counts()),
        ),
        corpus=str(Path(corpus).expanduser().resolve()),
        querybank=QuerybankSettings(
            config.querybank.beta, config.querybank.m, str(config.bank) if config.bank else "corpus"
        ),
        max_memory=config.max_memory,
        runtime=encoder.runtime,
    )


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{r}: {n}" for r, n in counts.most_common()) or "no records"
