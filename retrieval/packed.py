"""A base packed for exact search's skinny products: 16 to a few hundred queries at a time.

A BLAS product of a few dozen queries against N x D vectors reaches 25-75% of the machine's
GEMM throughput here: BLAS copies ("packs") the N x D operand into its own layout on every
call, and reads it row by row. Packing it once, six rows interleaved by dimension, lets the
`_skinny` C kernel stream each block of six rows sequentially and keep a 6 x 16 block of
scores in registers, with the top-k kept in a heap per query as it goes (no score matrix).
That reaches 68-93% of GEMM at 16 queries, 83-107% from 64 up (benchmarks/README.md). The
packed copy costs as much memory as the vectors themselves, so indexes make it on their first
batched search.

The kernel needs x86-64 with AVX2 and FMA and a C compiler at install time; `available()`
says whether it is there, and exact search falls back to BLAS when it is not.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

try:
    from . import _skinny
except ImportError:  # built without a C compiler: exact search uses BLAS alone
    _skinny = None

ROWS = 6  # base rows per packed block: 6 x 16 accumulators fill 12 of the 16 AVX2 registers
GROUP = 16  # queries per register block (two AVX2 vectors)
CHUNK = 64  # queries per pass over the base: their (64, D) block stays in L2 cache
SHARES = 8  # row ranges per thread, claimed as threads come free


def available() -> bool:
    """Whether the packed kernel was built and this CPU runs it (AVX2 + FMA)."""
    return _skinny is not None and bool(_skinny.available())


@dataclass(frozen=True, eq=False)  # identity: comparing arrays elementwise means nothing here
class PackedBase:
    """``blocks`` (ceil(N/6), D, 6) float32: rows 6b..6b+5 of an (N, D) base, by dimension."""

    blocks: np.ndarray
    n: int
    # Kept with the base: starting threads for each search cost ~0.4 ms here, 3% of a
    # 16-query search of 100k x 512. Idle workers hold no CPU; they end with the base.
    _pool: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        b = self.blocks  # the C kernel reads it as raw float32: check what it cannot
        if b.dtype != np.float32 or not b.flags.c_contiguous or b.ndim != 3 or b.shape[2] != ROWS:
            raise ValueError(f"packed blocks must be C-contiguous float32 (B, D, {ROWS})")
        if len(b) != -(-self.n // ROWS):
            raise ValueError(f"{len(b)} blocks cannot hold {self.n} rows")
        pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="packed")
        object.__setattr__(self, "_pool", pool)

    def __reduce__(self):
        return PackedBase, (self.blocks, self.n)  # a copy gets a pool of its own

    @classmethod
    def pack(cls, xb: np.ndarray) -> PackedBase:
        """Pack ``xb`` (N, D) float32; the last block is padded with zero rows."""
        n, d = xb.shape
        blocks = np.zeros((-(-n // ROWS), d, ROWS), np.float32)
        whole = n // ROWS * ROWS
        blocks[: whole // ROWS] = xb[:whole].reshape(-1, ROWS, d).transpose(0, 2, 1)
        if whole < n:
            blocks[-1, :, : n - whole] = xb[whole:].T
        return cls(blocks, n)

    @property
    def dim(self) -> int:
        return self.blocks.shape[1]

    def top(self, queries: np.ndarray, k: int, threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best rows by inner product for each of ``queries`` (Q, D), k < N.

        Returns scores (Q, k) float32 and rows (Q, k) int64, best first; rows index the
        packed base. Equal scores come in no particular order: callers break ties.
        """
        scores = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        for start in range(0, len(queries), CHUNK):
            chunk = queries[start : start + CHUNK]
            s, r = self._chunk_top(chunk, k, threads)
            scores[start : start + len(chunk)], rows[start : start + len(chunk)] = s, r
        return scores, rows

    def _chunk_top(self, queries: np.ndarray, k: int, threads: int):
        """One pass over the base for up to `CHUNK` queries, shared between threads."""
        groups = -(-len(queries) // GROUP)
        padded = np.zeros((groups * GROUP, self.dim), np.float32)  # zero queries: discarded
        padded[: len(queries)] = queries
        qp = np.ascontiguousarray(padded.reshape(groups, GROUP, -1).transpose(0, 2, 1))
        ranges = _row_ranges(self.n, len(self.blocks), threads)
        claim = itertools.count()  # next() is atomic under the GIL: each range is scanned once
        heaps = [
            (np.full((groups * GROUP, k), -np.inf, np.float32), np.full((groups * GROUP, k), -1))
            for _ in range(threads)
        ]

        def scan(t: int) -> None:
            hs, hr = heaps[t]  # this thread's heaps, carried from range to range
            while (r := next(claim)) < len(ranges):
                lo, hi = ranges[r]
                _skinny.topk(self.blocks, self.n, self.dim, qp, groups, lo, hi, k, hs, hr)

        helpers = [self._pool.submit(scan, t) for t in range(1, threads)]
        try:
            scan(0)  # this thread takes part, so a single-threaded search starts no thread at all
        finally:
            for _ in ranges:  # on an error here, leave the helpers nothing more to scan
                next(claim)
            for done in helpers:
                done.cancel()  # queued behind other searches: every range is taken already
            wait(helpers)
        for done in helpers:
            if not done.cancelled():
                done.result()  # re-raises a helper's error here
        hs = np.concatenate([h[0] for h in heaps], axis=1)[: len(queries)]  # (Q, threads * k)
        hr = np.concatenate([h[1] for h in heaps], axis=1)[: len(queries)]
        best = np.argsort(-hs, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(hs, best, 1), np.take_along_axis(hr, best, 1)


def _row_ranges(n: int, nblocks: int, threads: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) cut at block boundaries, `SHARES` per thread (one when single).

    Threads claim ranges as they go rather than taking a fixed share each: on a shared
    machine one core is often slowed for a while, and with fixed halves the whole search waits
    for it (a quarter of 16-query searches took 1.3x the median here).
    """
    parts = 1 if threads == 1 else min(nblocks, threads * SHARES)
    cuts = [min(n, b * ROWS) for b in np.linspace(0, nblocks, parts + 1).astype(int)]
    return [(lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo]
