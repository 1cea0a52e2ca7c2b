"""The ``embeddings/`` folder of an index version: the vectors FAISS was built from, kept.

fp16 copies of every image and caption vector (rows are FAISS ids, removed rows included), the
caption -> item map and the querybank normalisers. The query layer re-scores candidates from
them exactly; `verify` checks FAISS against them; `compact` and `add` rebuild without
re-encoding. With ``build --patch-tokens`` also ``patches.npy``: each image's patch tokens
(I, P, W) fp16, what the re-ranker (`retrieval.query.rerank`) reads instead of decoding images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import layout


@dataclass
class Embeddings:
    """The ``embeddings/`` folder of a version; rows are FAISS ids, removed rows included."""

    image: np.ndarray  # (I, D) image embeddings (stored fp16)
    caption: np.ndarray  # (C, D) caption embeddings (stored fp16)
    caption_owner: np.ndarray  # (C,) int64 item row of each caption row
    image_norm: np.ndarray  # (I,) float32 querybank normalisers, text->image
    caption_norm: np.ndarray  # (C,) float32 querybank normalisers, image->text
    patches: np.ndarray | None = None  # (I, P, W) fp16 patch tokens (build --patch-tokens)


PATCHES = "patches.npy"  # in embeddings/


def save_embeddings(folder: Path, emb: Embeddings, bank=None) -> None:
    """Write ``embeddings/``; ``bank``: (images, captions) of a separate querybank corpus."""
    out = folder / layout.EMBEDDINGS
    out.mkdir()
    # fp16 copies for exact re-scoring, verification and rebuilds without re-encoding.
    np.save(out / "image.npy", np.asarray(emb.image, dtype=np.float16))
    np.save(out / "caption.npy", np.asarray(emb.caption, dtype=np.float16))
    np.save(out / "caption_owner.npy", np.asarray(emb.caption_owner, dtype=np.int64))
    np.save(out / "image.qbnorm.npy", np.asarray(emb.image_norm, dtype=np.float32))
    np.save(out / "caption.qbnorm.npy", np.asarray(emb.caption_norm, dtype=np.float32))
    if bank is not None:  # kept so that `add` can normalise new items against the same bank
        np.save(out / "bank.image.npy", np.asarray(bank[0], dtype=np.float16))
        np.save(out / "bank.caption.npy", np.asarray(bank[1], dtype=np.float16))


def save_patches(folder: Path, pieces: Iterable[np.ndarray], shape: tuple[int, ...]) -> None:
    """Write ``embeddings/patches.npy`` of ``shape`` (rows, P, W) fp16 from consecutive
    ``pieces``, one at a time (the whole array need not be in memory at once)."""
    path = folder / layout.EMBEDDINGS / PATCHES
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    at = 0
    for piece in pieces:
        out[at : at + len(piece)] = piece
        at += len(piece)
    if at != shape[0]:  # a bug upstream: never publish patch rows out of step with the images
        raise AssertionError(f"patch tokens for {at} rows, {shape[0]} expected")
    out.flush()
    del out


def chunks(patches: np.ndarray, rows: np.ndarray | None = None, size: int = 4096):
    """``patches[rows]`` (all rows: None) a few thousand rows at a time."""
    n = len(patches) if rows is None else len(rows)
    for s in range(0, n, size):
        yield patches[s : s + size] if rows is None else patches[rows[s : s + size]]


def load_embeddings(folder: Path, mmap: bool = True) -> Embeddings:
    src = folder / layout.EMBEDDINGS
    mode = "r" if mmap else None
    patches = src / PATCHES
    return Embeddings(
        image=np.load(src / "image.npy", mmap_mode=mode),
        caption=np.load(src / "caption.npy", mmap_mode=mode),
        caption_owner=np.load(src / "caption_owner.npy"),
        image_norm=np.load(src / "image.qbnorm.npy"),
        caption_norm=np.load(src / "caption.qbnorm.npy"),
        patches=np.load(patches, mmap_mode="r") if patches.is_file() else None,
    )
