"""The ways back from a damaged index: ``verify --repair`` and ``verify --rollback``.

A version's files are of two kinds. **Derived** ones can be computed again from the others
without the model: the two FAISS indexes (from the fp16 vectors in ``embeddings/``, every row
FAISS held, tombstones included, with the recorded factory and search knob) and the querybank
normalisers (against the stored bank, or the live corpus itself). **Primary** ones cannot: the
vectors, the caption -> item map, the LMDB metadata, the skip record and the manifest. `repair`
rebuilds what is derived into a new version, published like any change (so a crash leaves the
damaged one as it was), and names what it rebuilt; when primary data is damaged it changes
nothing and names the ways that remain: `rollback` to the previous version, if it verifies, or
a rebuild from the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import DamagedIndexError
from . import autoindex, integrity, layout, querybank
from .config import BankConfig
from .embeddings import PATCHES, Embeddings, save_embeddings
from .lifecycle import change_manifest, copy_store, link_files, save_indexes, unit_rows
from .manifest import INDEX_FILES, KINDS, MANIFEST, Manifest, read_manifest
from .store import Store
from .vector_index import VectorIndex

NORMALISERS = {"image": "embeddings/image.qbnorm.npy", "caption": "embeddings/caption.qbnorm.npy"}
DERIVED = set(INDEX_FILES.values()) | set(NORMALISERS.values())


@dataclass
class RepairReport:
    name: str
    rebuilt: list[str] = field(default_factory=list)  # files computed again
    problems: list[str] = field(default_factory=list)  # what was wrong

    def summary(self) -> str:
        if not self.rebuilt:
            return f"index {self.name!r} verifies: nothing to repair"
        approx = any(r in NORMALISERS.values() for r in self.rebuilt)
        note = " (querybank normalisers against the corpus as it is now)" if approx else ""
        return (
            f"repaired index {self.name!r}: rebuilt {', '.join(self.rebuilt)} from the stored "
            f"vectors{note} (was: {'; '.join(self.problems)}); `retrieval verify {self.name}` "
            "checks it"
        )


def repair(name: str, index_dir: str | Path | None = None, wait: float = 0.0) -> RepairReport:
    """Rebuild the derived files of index ``name`` that are damaged, as a new version."""
    root = layout.index_root(index_dir)
    with layout.writer_lock(root, name, wait):
        current = integrity.resolve(name, root)
        manifest = read_manifest(current)
        problems = integrity.hash_problems(current, manifest)
        report = RepairReport(name, problems=problems)
        bad = {p.split(" ", 1)[0] for p in problems}
        primary = sorted(bad - DERIVED)
        if primary:
            raise DamagedIndexError(
                f"index {name!r}: {primary[0]} is damaged and is primary data (it cannot be "
                f"derived from the other files); {_primary_way_out(name, root)}"
            )
        if not bad:
            return report
        report.rebuilt = sorted(bad)
        layout.commit(root, name, lambda folder: _rebuild(current, folder, manifest, bad))
    return report


def _primary_way_out(name: str, root: Path) -> str:
    previous = _previous_sound(name, root)
    back = (
        f"`retrieval verify {name} --rollback` returns to the previous version ({previous.name}, "
        "which verifies)"
        if previous is not None
        else "no previous version verifies"
    )
    return f"{back}, or rebuild it: `retrieval build CORPUS --name {name} --resume`"


def _rebuild(current: Path, folder: Path, manifest: Manifest, bad: set[str]) -> Manifest:
    """Write a version with the derived files in ``bad`` computed again; the rest shared."""
    copy_store(current, folder)
    with Store.open(current / layout.STORE) as store:
        rows = {kind: _faiss_rows(store, kind) for kind in KINDS}
        dead = {kind: store.tombstones(kind) for kind in KINDS}
    emb = _vectors(current, bad)
    vectors = {"image": emb.image, "caption": emb.caption}
    indexes = {}
    for kind in KINDS:
        entry = manifest.indexes[kind]
        if INDEX_FILES[kind] in bad:
            built = VectorIndex.build(
                unit_rows(vectors[kind][rows[kind]]), rows[kind], entry.factory
            )
            indexes[kind] = autoindex.apply(built, entry)
        else:
            indexes[kind] = autoindex.apply(
                VectorIndex.load(current / entry.file, entry.factory), entry
            )
    save_indexes(indexes, folder)
    for kind in KINDS:  # as a searcher sees them: removed rows are not part of the bank
        indexes[kind].exclude(dead[kind])
    if bad & set(NORMALISERS.values()):
        _write_embeddings(current, folder, emb, indexes, manifest, bad)
    else:
        link_files(current, folder, layout.EMBEDDINGS)
    link_files(current, folder, layout.SKIPPED)
    out = change_manifest(current, folder, indexes, "repair", {"rebuilt": sorted(bad)})
    return replace(
        out, indexes={k: replace(out.indexes[k], search=manifest.indexes[k].search) for k in KINDS}
    )


def _vectors(current: Path, bad: set[str]) -> Embeddings:
    """The stored vectors and caption map (sound: only derived files are damaged); normalisers
    that are damaged read as zeros, to be computed again."""
    src = current / layout.EMBEDDINGS
    image = np.load(src / "image.npy", mmap_mode="r")
    caption = np.load(src / "caption.npy", mmap_mode="r")

    def norms(kind: str, n: int) -> np.ndarray:
        rel = NORMALISERS[kind]
        return np.zeros(n, np.float32) if rel in bad else np.load(current / rel)

    owner = np.load(src / "caption_owner.npy")
    return Embeddings(
        image, caption, owner, norms("image", len(image)), norms("caption", len(caption))
    )


def _faiss_rows(store: Store, kind: str) -> np.ndarray:
    """The rows FAISS held: the live ones and the tombstoned ones (removed, not yet compacted)."""
    return np.union1d(store.rows(kind), store.tombstones(kind)).astype(np.int64)


def _write_embeddings(current, folder, emb: Embeddings, indexes, manifest, bad: set[str]) -> None:
    """``embeddings/`` with the damaged normalisers computed again (the sound one kept as it
    is): against the stored bank when the index was built with one, else against the live
    corpus (its FAISS indexes, tombstones excluded). Built from fp16 vectors against today's
    corpus, they are close to the build's, not equal (a build's are from float32 vectors)."""
    config = BankConfig(beta=manifest.querybank.beta, m=manifest.querybank.m)
    src = current / layout.EMBEDDINGS
    kept = None
    if (src / "bank.image.npy").is_file():
        kept = (np.load(src / "bank.image.npy"), np.load(src / "bank.caption.npy"))
    norms = {"image": emb.image_norm, "caption": emb.caption_norm}
    for kind, other in (("image", "caption"), ("caption", "image")):
        if NORMALISERS[kind] not in bad:
            continue
        vectors = unit_rows(emb.image if kind == "image" else emb.caption)
        if kept is not None:
            bank = unit_rows(kept[1] if kind == "image" else kept[0])
            norms[kind] = querybank.normalisers(vectors, bank, config)
        else:
            norms[kind] = querybank.normalisers_in(vectors, indexes[other], config)
    fresh = replace(emb, image_norm=norms["image"], caption_norm=norms["caption"])
    save_embeddings(folder, fresh, bank=kept)
    if (src / PATCHES).is_file():  # not derived: kept as it is
        layout.link_or_copy(src / PATCHES, folder / layout.EMBEDDINGS / PATCHES)


def rollback(name: str, index_dir: str | Path | None = None, wait: float = 0.0) -> str:
    """Point ``name`` back at its previous version, which must verify; say which it is."""
    root = layout.index_root(index_dir)
    with layout.writer_lock(root, name, wait):
        manifest = _readable(name, root)
        if manifest is not None and manifest.milvus is not None:  # versions are collections
            from .milvus.backend import rollback as milvus_rollback

            return f"Milvus collection {milvus_rollback(manifest, root, wait)}"
        previous = _previous_sound(name, root)
        if previous is None:
            raise DamagedIndexError(
                f"index {name!r} has no previous version that verifies; rebuild it: "
                f"`retrieval build CORPUS --name {name} --resume`"
            )
        layout.publish(previous, root, name)
    return str(previous)


def _readable(name: str, root: Path) -> Manifest | None:
    """The published version's manifest, or None where it is damaged or gone."""
    try:
        return read_manifest(integrity.resolve(name, root))
    except (DamagedIndexError, FileNotFoundError):
        return None


def _previous_sound(name: str, root: Path) -> Path | None:
    """The newest version of ``name`` other than the published one whose files all match."""
    link = root / name
    current = link.resolve() if link.is_symlink() else None
    versions = root / ".versions" / name
    if not versions.is_dir():
        return None
    candidates = [
        v for v in versions.iterdir() if v.resolve() != current and (v / MANIFEST).is_file()
    ]
    for version in sorted(candidates, key=lambda v: (v / MANIFEST).stat().st_mtime, reverse=True):
        try:
            if not integrity.hash_problems(version, read_manifest(version)):
                return version
        except DamagedIndexError:
            continue
    return None
