"""`retrieval build`: corpus -> checked records -> embeddings -> FAISS + LMDB -> published folder.

Bad records never stop a build and never vanish: each one is written with its reason to
``skipped.jsonl`` in the index folder, and the report counts them by reason.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, layout, querybank
from .data import ReadOptions, Record, read_corpus, unique_records
from .encoder import Encoder, ModelSpec, sha256_file
from .errors import IndexBuildError
from .images import DEFAULT_MAX_PIXELS
from .index import VectorIndex
from .querybank import BankConfig
from .store import ItemEntry, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    index: str = "auto"  # "auto" or a FAISS factory string, used for both indexes
    batch_size: int = 64
    workers: int | None = None  # image-decoding processes; None: cores - 1
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    read: ReadOptions = field(default_factory=ReadOptions)
    progress: bool = True
    bank: Path | None = None  # querybank corpus; None: the corpus's own captions and images
    querybank: BankConfig = field(default_factory=BankConfig)


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

    def summary(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{r}: {n}" for r, n in self.skipped.most_common()) or "none"
        return (
            f"index {self.name!r}: {self.items} images and {self.captions} captions encoded in "
            f"{self.seconds:.1f}s; skipped {skipped} ({reasons}); "
            f"{self.truncated} captions truncated to the context length; "
            f"indexes {self.factories['image']} (images), {self.factories['caption']} "
            f"(captions); at {self.path}"
        )


@dataclass
class _Skips:
    """The skip report as it grows: one JSON object per skipped record or caption."""

    rows: list[dict] = field(default_factory=list)

    def add(self, kind: str, id_: str, reason: str, **detail) -> None:
        self.rows.append({"kind": kind, "id": id_, "reason": reason, **detail})

    def counts(self) -> Counter:
        return Counter(r["reason"] for r in self.rows if r["kind"] != "truncated caption")


def build(
    corpus: str | Path,
    name: str,
    config: BuildConfig | None = None,
    index_dir: str | Path | None = None,
    encoder: Encoder | None = None,
) -> BuildReport:
    """Build index ``name`` from ``corpus`` and publish it atomically under ``index_dir``."""
    config = config or BuildConfig()
    start = time.perf_counter()
    layout.check_name(name)
    root = layout.index_root(index_dir)
    skips = _Skips()
    records, dropped = unique_records(read_corpus(corpus, config.read))
    for id_, path, reason in dropped:
        skips.add("item", id_, reason, **({"path": path} if path else {}))
    encoder = encoder or Encoder.load(config.model, config.device)
    emb, positions, failures = encoder.encode_image_files(
        [r.image for r in records],
        config.batch_size,
        config.workers,
        config.max_pixels,
        progress=config.progress,
    )
    for pos, reason in sorted(failures.items()):
        skips.add("item", records[pos].id, reason, path=str(records[pos].image))
    kept = [records[p] for p in positions]
    if not kept:
        raise IndexBuildError(
            f"nothing to index: all {len(records) + len(skips.rows)} records of {corpus} were "
            f"skipped ({_reasons(skips.counts())})"
        )
    entries, texts = _entries(kept, encoder, skips)
    cap_emb = encoder.encode_texts(texts, progress=config.progress)
    root.mkdir(parents=True, exist_ok=True)
    folder = layout.new_version(root, name)
    try:
        factories = _write(folder, entries, emb, cap_emb, config, encoder)
        _write_skips(folder, skips)
        seconds = time.perf_counter() - start
        manifest = _manifest(
            name, corpus, encoder, entries, texts, skips, factories, folder, config
        )
        manifest["build_seconds"] = round(seconds, 3)
        layout.write_manifest(folder, manifest)
        link = layout.publish(folder, root, name)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    truncated = sum(1 for r in skips.rows if r["kind"] == "truncated caption")
    return BuildReport(
        name, link, len(entries), len(texts), skips.counts(), truncated, seconds, factories
    )


def _entries(kept: list[Record], encoder: Encoder, skips: _Skips):
    """Assign rows: item row = its position; caption rows in order; drop empty captions."""
    entries, texts = [], []
    for row, r in enumerate(kept):
        caps = []
        for i, text in enumerate(r.captions):
            cid = f"{r.id}#{i}"
            if not text:
                skips.add("caption", cid, "empty caption", item=r.id)
                continue
            caps.append((cid, len(texts), text))
            texts.append(text)
        entries.append(ItemEntry(r.id, row, str(r.image), tuple(caps), r.extra))
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


def _write(folder: Path, entries, emb, cap_emb, config: BuildConfig, encoder) -> dict[str, str]:
    device = "cuda" if encoder.device.type == "cuda" else "cpu"
    image_index = VectorIndex.build(emb, np.arange(len(emb)), config.index, device)
    cap_factory = config.index if len(cap_emb) else "Flat"
    if len(cap_emb) == 0:
        cap_emb = np.zeros((0, emb.shape[1]), np.float32)
    caption_index = VectorIndex.build(cap_emb, np.arange(len(cap_emb)), cap_factory, device)
    image_index.save(folder / layout.IMAGE_INDEX)
    caption_index.save(folder / layout.CAPTION_INDEX)
    (folder / layout.EMBEDDINGS).mkdir()
    # fp16 copies for exact re-scoring and rebuilds without re-encoding; rows = FAISS ids.
    np.save(folder / layout.EMBEDDINGS / "image.npy", emb.astype(np.float16))
    np.save(folder / layout.EMBEDDINGS / "caption.npy", cap_emb.astype(np.float16))
    owner = np.array([e.row for e in entries for _ in e.captions], dtype=np.int64)
    np.save(folder / layout.EMBEDDINGS / "caption_owner.npy", owner)  # caption row -> item row
    bank_text, bank_images = cap_emb, emb
    if config.bank is not None:
        bank_images, bank_text = querybank.encode_bank(config.bank, encoder, config.read)
    np.save(
        folder / layout.EMBEDDINGS / "image.qbnorm.npy",
        querybank.normalisers(emb, bank_text, config.querybank),
    )
    np.save(
        folder / layout.EMBEDDINGS / "caption.qbnorm.npy",
        querybank.normalisers(cap_emb, bank_images, config.querybank),
    )
    with Store.create(folder / layout.STORE) as store:
        store.put_items(entries)
    return {"image": image_index.factory, "caption": caption_index.factory}


def _write_skips(folder: Path, skips: _Skips) -> None:
    with (folder / layout.SKIPPED).open("w", encoding="utf-8") as f:
        for row in skips.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _manifest(
    name, corpus, encoder: Encoder, entries, texts, skips, factories, folder, config: BuildConfig
) -> dict:
    checksums = {f: sha256_file(folder / f) for f in (layout.IMAGE_INDEX, layout.CAPTION_INDEX)}
    return {
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "package_version": __version__,
        **encoder.spec.describe(),
        "dim": encoder.dim,
        "context_length": encoder.context_length,
        "indexes": {
            "image": {
                "file": layout.IMAGE_INDEX,
                "factory": factories["image"],
                "count": len(entries),
            },
            "caption": {
                "file": layout.CAPTION_INDEX,
                "factory": factories["caption"],
                "count": len(texts),
            },
        },
        "counts": {
            "items": len(entries),
            "captions": len(texts),
            "skipped": sum(skips.counts().values()),
            "skipped_by_reason": dict(skips.counts()),
        },
        "corpus": str(Path(corpus).expanduser().resolve()),
        "querybank": {
            "beta": config.querybank.beta,
            "m": config.querybank.m,
            "bank": str(config.bank) if config.bank else "corpus",
        },
        "sha256": checksums,
    }


def _reasons(counts: Counter) -> str:
    return ", ".join(f"{r}: {n}" for r, n in counts.most_common()) or "no records"
