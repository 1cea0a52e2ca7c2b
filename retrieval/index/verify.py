"""`retrieval verify`: is a published index whole and consistent with itself and its corpus?

Checks, each reported with what it found: the manifest's checksums; the counts of both FAISS
indexes against the store (live items + tombstones); every FAISS id resolvable to a live item
or caption, or a tombstone, and every live row present in FAISS; the stored fp16 embeddings
against FAISS's vectors and the caption -> item map; and a seeded sample of items re-encoded
from their files (and their captions from their text) against the stored vectors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DamagedIndexError, EncoderError
from ..files import sha256_file
from ..model.encoder import Encoder
from ..model.runtime import FOLLOW_INDEX, RuntimeChoice
from ..model.spec import ModelSpec
from ..scoring.metrics import row_cosines
from . import autoindex, integrity, layout
from .config import VERIFY_SAMPLE
from .embeddings import load_embeddings
from .manifest import KINDS as _KINDS
from .manifest import Manifest, read_manifest
from .store import Store
from .vector_index import VectorIndex

log = logging.getLogger(__name__)

# fp16 storage keeps ~3 significant digits; a wrong vector is far below this.
MIN_COSINE = 0.995


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyReport:
    name: str
    folder: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, problems: list[str], fine: str) -> None:
        shown = "; ".join(problems[:5]) + (
            f"; ... ({len(problems)} in all)" if len(problems) > 5 else ""
        )
        self.checks.append(Check(name, not problems, shown if problems else fine))

    def summary(self) -> str:
        lines = [f"index {self.name!r} at {self.folder}:"]
        lines += [f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        failed = sum(not c.ok for c in self.checks)
        if self.ok:
            lines.append("verified: all checks passed")
        else:
            lines.append(f"{failed} check(s) FAILED; {integrity.way_out(self.name)}")
        return "\n".join(lines)


def verify(
    name: str,
    index_dir: str | Path | None = None,
    sample: int = VERIFY_SAMPLE,
    encoder: Encoder | None = None,
    seed: int = 0,
    model: ModelSpec | None = None,
    device: str = "cpu",
    runtime: RuntimeChoice = FOLLOW_INDEX,
) -> VerifyReport:
    """Run every check on index ``name``; ``sample`` items are re-encoded (0: none) by
    ``encoder``, or the index's model (``model``: at another path, checked), on ``device``,
    run by ``runtime`` (left out: the index's own; another precision moves the vectors)."""
    folder = layout.index_root(index_dir) / layout.check_name(name)
    report = VerifyReport(name, folder.resolve())
    try:
        folder = integrity.resolve(name, index_dir)
        manifest = read_manifest(folder)
    except DamagedIndexError as e:  # nothing else can be checked against it
        report.add("manifest", [str(e).split("; `retrieval verify")[0]], "")
        return report
    spec = manifest.spec_for(model)  # a mismatch is the caller's error, not a finding

    def load() -> Encoder:
        enc = encoder or Encoder.load(spec, device, runtime.over(manifest.runtime))
        if enc.runtime.precision != manifest.runtime.precision:
            log.warning(
                "re-encoding with %s an index built with %s: the precisions' embeddings differ "
                "by more than this check's tolerance, so a mismatch may be theirs, not the index's",
                enc.runtime, manifest.runtime,
            )  # fmt: skip
        return enc

    report.add("checksums", _checksums(folder, manifest), f"{len(manifest.sha256)} files match")
    try:
        if manifest.milvus is not None:
            _milvus(report, folder, manifest, sample, load, seed)
        else:
            _consistency(report, folder, manifest, sample, load, seed)
    except Exception as e:  # unreadable FAISS / LMDB / numpy files are a finding, not a crash
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        report.add("readable", [f"{type(e).__name__}: {detail}"], "")
    report.add("skip report", _skipped(folder), "readable")
    return report


def _consistency(
    report: VerifyReport, folder: Path, manifest: Manifest, sample, load, seed
) -> None:
    indexes = {
        kind: VectorIndex.load(folder / e.file, e.factory) for kind, e in manifest.indexes.items()
    }
    emb = load_embeddings(folder)
    with Store.open(folder / layout.STORE) as store:
        live = {kind: store.rows(kind) for kind in _KINDS}
        dead = {kind: store.tombstones(kind) for kind in _KINDS}
        report.add("counts", _counts(manifest, indexes, store, live, dead), _count_text(live, dead))
        for kind in _KINDS:
            report.add(
                f"{kind} ids",
                _ids(indexes[kind], live[kind], dead[kind], kind),
                "every id resolves",
            )
        report.add("store", _store(store, live, emb), "items, captions and row maps agree")
        report.add(
            "embeddings", _embeddings(indexes, live, emb, manifest), "stored vectors match FAISS"
        )
        if sample:
            try:
                problems, detail = _reencode(store, live, emb, load(), sample, seed)
            except EncoderError as e:  # the model, not the files: say so under its own check
                problems, detail = [str(e)], ""
            report.add("re-encoded sample", problems, detail)


def _milvus(report: VerifyReport, folder: Path, manifest: Manifest, sample, load, seed) -> None:
    from .milvus import checks

    root = layout.root_of(folder)
    for name, problems, fine in checks.consistency(manifest, root):
        report.add(name, problems, fine)
    if sample:
        items, images, captions = checks.sample(manifest, root, sample, seed)
        try:
            problems, detail = _compare(items, images, captions, load())
        except EncoderError as e:
            problems, detail = [str(e)], ""
        report.add("re-encoded sample", problems, detail)


def _checksums(folder: Path, manifest: Manifest) -> list[str]:
    problems = []
    for rel, digest in sorted(manifest.sha256.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel} changed since it was written (sha256 mismatch)")
    if not manifest.sha256:
        problems.append("the manifest records no checksums")
    return problems


def _count_text(live, dead) -> str:
    return (
        f"{len(live['image'])} items, {len(live['caption'])} captions, "
        f"{len(dead['image'])} + {len(dead['caption'])} tombstones"
    )


def _counts(manifest: Manifest, indexes, store: Store, live, dead) -> list[str]:
    problems = []
    counts = store.counts()
    for kind in _KINDS:
        want = len(live[kind]) + len(dead[kind])
        if indexes[kind].ntotal != want:
            problems.append(
                f"{kind} index holds {indexes[kind].ntotal} vectors, the store {len(live[kind])} "
                f"live rows + {len(dead[kind])} tombstones = {want}"
            )
        if manifest.indexes[kind].count != indexes[kind].ntotal:
            problems.append(
                f"manifest says {manifest.indexes[kind].count} {kind} vectors, "
                f"the index holds {indexes[kind].ntotal}"
            )
    if counts["items"] != len(live["image"]) or counts["captions"] != len(live["caption"]):
        problems.append(f"store entries {counts} do not match its row maps")
    if manifest.counts.items != counts["items"]:
        problems.append(f"manifest says {manifest.counts.items} items, the store {counts['items']}")
    return problems


def _ids(index: VectorIndex, live: np.ndarray, dead: np.ndarray, kind: str) -> list[str]:
    ids = index.ids()
    problems = []
    if len(np.unique(ids)) != len(ids):
        problems.append(f"{kind} index holds {len(ids) - len(np.unique(ids))} duplicate ids")
    stray = np.setdiff1d(ids, np.union1d(live, dead))
    if len(stray):
        problems.append(f"{len(stray)} {kind} ids resolve to nothing (e.g. {stray[:3].tolist()})")
    lost = np.setdiff1d(live, ids)
    if len(lost):
        problems.append(
            f"{len(lost)} live {kind} rows are not in the index (e.g. {lost[:3].tolist()})"
        )
    both = np.intersect1d(live, dead)
    if len(both):
        problems.append(f"{len(both)} {kind} rows are both live and tombstoned")
    ghosts = np.setdiff1d(dead, ids)
    if len(ghosts):
        problems.append(f"{len(ghosts)} {kind} tombstones name rows the index does not hold")
    return problems


def _store(store: Store, live, emb) -> list[str]:
    problems = []
    for kind, rows, limit in (
        ("image", live["image"], len(emb.image)),
        ("caption", live["caption"], len(emb.caption)),
    ):
        if len(rows) and rows[-1] >= limit:
            problems.append(f"{kind} row {rows[-1]} has no stored embedding ({limit} rows)")
    for it in store.iter_items():
        if store.item_ids([it["row"]])[0] != it["id"]:
            problems.append(f"item {it['id']!r}: row {it['row']} maps to another id")
        for cap in it["captions"]:
            c = store.caption(cap["id"])
            if c is None or c["item"] != it["id"]:
                problems.append(
                    f"caption {cap['id']!r} of item {it['id']!r} is missing or misfiled"
                )
            elif c["row"] >= len(emb.caption_owner) or emb.caption_owner[c["row"]] != it["row"]:
                problems.append(f"caption {cap['id']!r}: the caption -> item map disagrees")
        if len(problems) > 20:
            break
    return problems


def _embeddings(indexes, live, emb, manifest: Manifest) -> list[str]:
    """FAISS's vectors of a sample of live rows against the stored fp16 rows."""
    problems = []
    for kind in _KINDS:
        if autoindex.compressed(manifest.indexes[kind].factory):
            continue  # a compressed index keeps approximations only
        rows = live[kind][:: max(1, len(live[kind]) // 256)]
        stored = np.asarray((emb.image if kind == "image" else emb.caption)[rows], np.float32)
        cos = row_cosines(indexes[kind].vectors(rows), stored)
        bad = rows[cos < MIN_COSINE]
        if len(bad):
            problems.append(
                f"{len(bad)} {kind} rows differ from FAISS's vectors (e.g. row {bad[0]})"
            )
    return problems


def _reencode(store: Store, live, emb, encoder: Encoder, sample: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(live["image"], min(sample, len(live["image"])), replace=False))
    items = [store.item(i) | {"id": i} for i in store.item_ids(rows)]
    caption_rows = [store.caption(c["id"])["row"] for it in items for c in it["captions"]]
    images = np.asarray(emb.image[rows], np.float32)
    return _compare(items, images, np.asarray(emb.caption[caption_rows], np.float32), encoder)


def _compare(items: list[dict], images: np.ndarray, captions: np.ndarray, encoder: Encoder):
    """Re-encode ``items`` (their files, their captions' text) against their stored vectors:
    images (n, D) in item order, captions (C, D) in the items' caption order."""
    got, positions, failures = encoder.encode_image_files(
        [Path(i["path"]) for i in items], workers=0
    )
    problems = []
    cos = row_cosines(got, images[positions])
    for pos, c in zip(positions, cos, strict=True):
        if c < MIN_COSINE:
            problems.append(f"item {items[pos]['id']!r}: re-encoded image at cosine {c:.4f}")
    caps = [(c["id"], c["text"]) for it in items for c in it["captions"]]
    if caps:
        ccos = row_cosines(encoder.encode_texts([t for _, t in caps]), captions)
        problems += [
            f"caption {cid!r}: re-encoded at cosine {c:.4f}"
            for (cid, _), c in zip(caps, ccos, strict=True)
            if c < MIN_COSINE
        ]
    detail = (
        f"{len(positions)} images and {len(caps)} captions match (cosine >= {MIN_COSINE}, "
        f"re-encoded with {encoder.runtime})"
    )
    if failures:
        detail += f"; {len(failures)} sampled images could not be read again (not checked)"
    return problems, detail


def _skipped(folder: Path) -> list[str]:
    path = folder / layout.SKIPPED
    if not path.is_file():
        return ["skipped.jsonl is missing"]
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            json.loads(line)
        except ValueError:
            return [f"skipped.jsonl line {n} is not JSON"]
    return []
