"""Embeddings out of an index, in files other tools read: clip-retrieval's layout, .npz, Parquet.

Every live item (in the store's id order) with its image embedding, its captions' embeddings,
its id, path, captions and metadata. Read a chunk of items at a time from the memory-mapped
vectors and written as it goes, so 1M items need the memory of one chunk, not of the index.

- ``clip-retrieval``: ``img_emb/img_emb_<i>.npy`` (N_i, D), ``text_emb/text_emb_<i>.npy`` (N_i, D:
  each item's first caption, zeros for none) and ``metadata/metadata_<i>.parquet`` (``image_path``,
  ``caption``, ``id``, ``captions``, ``extra`` as JSON), one triple per chunk, rows aligned: what
  clip-retrieval's ``index`` and ``back`` and autofaiss read.
- ``npz``: one file; ``image`` (N, D), ``ids``, ``paths``, ``extra`` (JSON), ``caption`` (C, D),
  ``caption_ids``, ``caption_text``, ``caption_item`` (C,) (the row in ``ids`` of each caption).
- ``parquet``: one file, a row per item: ``id``, ``path``, ``captions``, ``extra`` (JSON),
  ``image_embedding`` and ``caption_embeddings`` (fixed-size lists).
Vectors are written as float16 (as stored) or float32, L2-normalised.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RetrievalError
from ..files import atomic_path
from . import integrity, layout
from .config import EXPORT_FORMATS as FORMATS
from .config import ExportConfig
from .embeddings import load_embeddings
from .store import Store


@dataclass
class Chunk:
    """A run of items: ``image`` (n, D), ``caption`` (c, D, the items' captions in order)."""

    ids: list[str]
    paths: list[str]
    captions: list[list[str]]
    caption_ids: list[list[str]]
    extra: list[str]  # JSON
    image: np.ndarray
    caption: np.ndarray


def export(name: str, out: Path, config: ExportConfig, index_dir=None) -> int:
    """Write index ``name``'s embeddings to ``out`` as ``config.format``; return the item count."""
    if config.format not in FORMATS:
        raise RetrievalError(f"unknown export format {config.format!r} ({', '.join(FORMATS)})")
    out = Path(out)
    _check_out(out, config.format)
    folder, manifest = integrity.open_version(name, index_dir)
    if manifest.milvus is not None:
        raise RetrievalError(
            f"index {name!r} lives in Milvus (collections {manifest.milvus.base}_items and "
            f"_captions at {manifest.milvus.uri}): read them with pymilvus, or build a FAISS "
            "copy (`retrieval build CORPUS --name NAME`) to export"
        )
    writer = {"clip-retrieval": _clip_retrieval, "npz": _npz, "parquet": _parquet}[config.format]
    with Store.open(folder / layout.STORE) as store:
        counts = store.counts()
        chunks = _chunks(store, folder, config)
        sizes = (counts["items"], counts["captions"], manifest.dim)
        if config.format == "clip-retrieval":
            writer(chunks, out, config, sizes)
        else:  # one file: all or nothing
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp:
                writer(chunks, tmp, config, sizes)
    return counts["items"]


def _check_out(out: Path, fmt: str) -> None:
    """Refuse, in one line, an OUT the format cannot be written to."""
    if fmt == "clip-retrieval":
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RetrievalError(
                f"{out} exists and is not an empty folder: clip-retrieval's layout is a folder of "
                "chunk files, and an earlier export's would be read with the new ones; give a "
                "new folder"
            )
    elif out.is_dir():
        raise RetrievalError(f"{out} is a folder: --format {fmt} writes one file")


def _chunks(store: Store, folder: Path, config: ExportConfig) -> Iterator[Chunk]:
    emb = load_embeddings(folder, mmap=True)
    items: list[dict] = []
    for item in store.iter_items():
        items.append(item)
        if len(items) == config.chunk:
            yield _chunk(items, store, emb, config.dtype)
            items = []
    if items:
        yield _chunk(items, store, emb, config.dtype)


def _chunk(items: list[dict], store: Store, emb, dtype: str) -> Chunk:
    caps = [it.get("captions", []) for it in items]
    rows = [store.caption(c["id"])["row"] for cs in caps for c in cs]
    return Chunk(
        ids=[it["id"] for it in items],
        paths=[str(it.get("path", "")) for it in items],
        captions=[[c["text"] for c in cs] for cs in caps],
        caption_ids=[[c["id"] for c in cs] for cs in caps],
        extra=[json.dumps(it.get("extra", {}), ensure_ascii=False) for it in items],
        image=_unit(emb.image[np.array([it["row"] for it in items])], dtype),
        caption=_unit(emb.caption[np.array(rows, dtype=np.int64)], dtype),
    )


def _unit(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) if len(x) else x
    return x.astype(dtype)


def _first_captions(chunk: Chunk) -> np.ndarray:
    """(n, D): each item's first caption's vector, zeros for an item without captions."""
    out = np.zeros_like(chunk.image)
    at = 0
    for i, cs in enumerate(chunk.captions):
        if cs:
            out[i] = chunk.caption[at]
        at += len(cs)
    return out


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise RetrievalError(
            "writing Parquet needs pyarrow, from the optional extra 'export': "
            "pip install 'retrieval[export]'"
        ) from None
    return pyarrow, pyarrow.parquet


def _clip_retrieval(chunks, out: Path, config: ExportConfig, sizes) -> None:
    pa, pq = _pyarrow()
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(chunks):
        np.save(out / "img_emb" / f"img_emb_{i}.npy", chunk.image)
        np.save(out / "text_emb" / f"text_emb_{i}.npy", _first_captions(chunk))
        table = pa.table(
            {
                "image_path": chunk.paths,
                "caption": [cs[0] if cs else "" for cs in chunk.captions],
                "id": chunk.ids,
                "captions": chunk.captions,
                "extra": chunk.extra,
            }
        )
        pq.write_table(table, out / "metadata" / f"metadata_{i}.parquet")


def _parquet(chunks, out: Path, config: ExportConfig, sizes) -> None:
    pa, pq = _pyarrow()
    dim = sizes[2]
    value = pa.float16() if config.dtype == "float16" else pa.float32()
    vector = pa.list_(value, dim)
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("path", pa.string()),
            ("captions", pa.list_(pa.string())),
            ("extra", pa.string()),
            ("image_embedding", vector),
            ("caption_embeddings", pa.list_(vector)),
        ]
    )
    with pq.ParquetWriter(out, schema) as writer:
        for chunk in chunks:
            bounds = np.cumsum([0] + [len(cs) for cs in chunk.captions])
            flat = pa.FixedSizeListArray.from_arrays(pa.array(chunk.caption.reshape(-1)), dim)
            per_item = pa.ListArray.from_arrays(pa.array(bounds, pa.int32()), flat)
            images = pa.FixedSizeListArray.from_arrays(pa.array(chunk.image.reshape(-1)), dim)
            plain = [chunk.ids, chunk.paths, chunk.captions, chunk.extra]
            columns = [pa.array(x, type=f.type) for x, f in zip(plain, schema, strict=False)]
            writer.write_table(pa.Table.from_arrays([*columns, images, per_item], schema=schema))


def _npz(chunks, out: Path, config: ExportConfig, sizes) -> None:
    """One pass over the chunks: image vectors stream into the zip; caption vectors into a
    memory-mapped .npy beside it (a zip takes one writer at a time), added at the end."""
    n, c, dim = sizes
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ("ids", "paths", "extra", "caption_ids", "caption_text")
    strings: dict[str, list] = {k: [] for k in keys}
    owners: list[np.ndarray] = []
    spill = out.with_name(f".{out.name}.caption.npy")
    captions = np.lib.format.open_memmap(spill, "w+", np.dtype(config.dtype), (c, dim))
    try:
        with zipfile.ZipFile(out, "w", allowZip64=True) as zf:
            with _npy_entry(zf, "image", (n, dim), config.dtype) as images:
                for chunk in chunks:
                    images.write(np.ascontiguousarray(chunk.image).tobytes())
                    at = sum(len(o) for o in owners)
                    captions[at : at + len(chunk.caption)] = chunk.caption
                    base = len(strings["ids"])
                    counts = [len(x) for x in chunk.captions]
                    owners.append(np.repeat(np.arange(base, base + len(chunk.ids)), counts))
                    for key, values in zip(keys, _strings(chunk), strict=True):
                        strings[key] += values
            captions.flush()
            zf.write(spill, "caption.npy")
            for key, values in strings.items():
                with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.array(values, dtype=str))
            with zf.open("caption_item.npy", "w", force_zip64=True) as f:
                owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
                np.lib.format.write_array(f, owner.astype(np.int64))
    finally:
        del captions
        spill.unlink(missing_ok=True)


def _strings(chunk: Chunk) -> tuple[list, ...]:
    """The chunk's ids, paths, extra, caption ids and caption texts, in the npz's order."""
    caption_ids = [i for ids in chunk.caption_ids for i in ids]
    texts = [t for cs in chunk.captions for t in cs]
    return chunk.ids, chunk.paths, chunk.extra, caption_ids, texts


class _npy_entry:
    """A ``.npy`` member of a zip written in pieces: the header for ``shape`` first, then the
    caller's raw C-order bytes."""

    def __init__(self, zf: zipfile.ZipFile, key: str, shape: tuple[int, ...], dtype: str) -> None:
        self.zf, self.key, self.shape, self.dtype = zf, key, shape, np.dtype(dtype)

    def __enter__(self):
        self.file = self.zf.open(f"{self.key}.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": self.shape}  # fmt: skip
        np.lib.format.write_array_header_1_0(self.file, header)
        return self.file

    def __exit__(self, *exc) -> None:
        self.file.close()
