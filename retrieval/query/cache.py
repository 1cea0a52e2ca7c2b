"""An LRU cache of query embeddings, shared by every request a searcher answers.

Keys say what was encoded: ``("t", text)`` for a text, ``("i", digest)`` for an image, the
digest of the pixels the model sees (so one photo uploaded twice, under any name, is encoded
once). The model is fixed for a searcher's life, and a newly published version of the index
keeps the model, so entries never go stale. Thread-safe: the batcher encodes while request
threads look up.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

DEFAULT_CACHE_SIZE = 1024  # query embeddings kept (each D float32: 2 MB at D=512)


@dataclass(frozen=True)
class CacheStats:
    size: int  # most entries kept; 0: caching is off
    entries: int
    hits: int
    misses: int


class EmbeddingCache:
    """At most ``size`` (1, D) query vectors, the least recently used dropped first."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        if size < 0:
            raise ValueError(f"the cache size must be 0 or more, not {size}")
        self.size = size
        self._entries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        """A copy of the vector stored under ``key`` (counted as a hit), or None (a miss)."""
        if not self.size:
            return None
        with self._lock:
            vec = self._entries.get(key)
            if vec is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
        return vec.copy()  # the caller's own: torch refuses read-only arrays

    def put(self, key: tuple[str, str], vec: np.ndarray) -> None:
        """Keep a copy of ``vec`` (1, D) under ``key``."""
        if not self.size:
            return
        vec = np.array(vec, dtype=np.float32, copy=True)
        with self._lock:
            self._entries[key] = vec
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.size, len(self._entries), self._hits, self._misses)
