"""Querybank normalisers, computed once at build time with FAISS and stored in the index.

For text->image, each image's normaliser is the log-sum-exp of its ``m`` highest similarities
to a bank of captions, at temperature ``beta``; for image->text, each caption's normaliser uses
a bank of images. A query then costs one index search plus a re-rank of its candidates
(`retrieval.scoring.fusion.querybank_scores`). The bank is the corpus's own captions and images by
default, or a separate corpus given at build time; benchmarks use a bank that never contains
their evaluation queries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..corpus.readers import read_corpus
from ..corpus.records import unique_records
from ..scoring.fusion import bank_normalisers
from .config import BankConfig
from .vector_index import VectorIndex


def normalisers(candidates: np.ndarray, bank: np.ndarray, config: BankConfig) -> np.ndarray:
    """(C,) float32 normaliser of each candidate (C, D) against ``bank`` (B, D) unit vectors."""
    if len(bank) == 0:
        return np.zeros(len(candidates), dtype=np.float32)
    index = VectorIndex.build(
        bank, np.arange(len(bank)), "Flat" if len(bank) < 200_000 else "HNSW32"
    )
    return normalisers_in(candidates, index, config)


def normalisers_in(candidates: np.ndarray, index: VectorIndex, config: BankConfig) -> np.ndarray:
    """(C,) normalisers of ``candidates`` (C, D) against a bank already indexed in ``index``."""
    live = index.ntotal - len(index.dead)
    if live <= 0:
        return np.zeros(len(candidates), dtype=np.float32)
    m = min(config.m, live)
    sims = np.full((len(candidates), m), -np.inf, dtype=np.float64)  # (C, m)
    for i, nb in enumerate(index.search(candidates, m)):
        sims[i, : len(nb.scores)] = nb.scores
    return bank_normalisers(sims, config.beta).astype(np.float32)


def encode_bank(corpus: Path, encoder, read) -> tuple[np.ndarray, np.ndarray]:
    """(images (B_i, D), captions (B_t, D)) of a separate bank corpus, encoded by ``encoder``."""
    records, _ = unique_records(read_corpus(corpus, read))
    images, _, _ = encoder.encode_image_files([r.image for r in records])
    texts = [c for r in records for c in r.captions if c]
    return images, encoder.encode_texts(texts)
