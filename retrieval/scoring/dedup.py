"""Near-duplicate folding of a ranked list: pure math on the results' embeddings.

Walking the list best first, a result whose cosine similarity to an already kept result reaches
the threshold is folded into the kept result it is most similar to; the order of what is kept
never changes.
"""

from __future__ import annotations

import numpy as np


def fold(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) int64: for each result (rows of ``vectors`` (N, D), unit, best first), the row of
    the kept result it is folded into, or its own row when it is kept."""
    n = len(vectors)
    owner = np.arange(n, dtype=np.int64)
    kept: list[int] = []
    for i in range(n):
        if kept:
            sims = vectors[kept] @ vectors[i]  # (K,) against what is kept so far
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                owner[i] = kept[best]
                continue
        kept.append(i)
    return owner
