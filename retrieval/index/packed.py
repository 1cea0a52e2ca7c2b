"""A base packed for exact search's skinny products: 16 to a few hundred queries at a time.

A BLAS product of a few dozen queries against N x D vectors reaches 25-75% of the machine's
GEMM throughput here: BLAS copies ("packs") the N x D operand into its own layout on every
call, and reads it row by row. Packing it once, six rows interleaved by dimension, lets the
`_skinny` C kernel stream each block of six rows sequentially and keep a 6 x 16 block of
scores in registers, with the top-k kept in a heap per query as it goes (no score matrix).
Each base has its own helper threads in C (`_skinny.Workers`), which take rows alongside the
calling thread with the GIL released and spin for 2 ms after a search, so back-to-back searches
do not pay for waking them (and a search never waits for one that is slow to wake). That
reaches a median 84-92% of GEMM at 16 queries and 98-106% at 64 (benchmarks/README.md). The
packed copy costs as much memory as the vectors themselves, so indexes make it on their first
batched search.

The kernel needs x86-64 with AVX2 and FMA and a C compiler at install time; `available()`
says whether it is there, and exact search falls back to BLAS when it is not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

try:
    from . import _skinny
except ImportError:  # built without a C compiler: exact search uses BLAS alone
    _skinny = None

ROWS = 6  # base rows per packed block: 6 x 16 accumulators fill 12 of the 16 AVX2 registers
GROUP = 16  # queries per register block (two AVX2 vectors)
CHUNK = 64  # queries per pass over the base: their (64, D) block stays in L2 cache


def available() -> bool:
    """Whether the packed kernel was built and this CPU runs it (AVX2 + FMA)."""
    return _skinny is not None and bool(_skinny.available())


@dataclass(frozen=True, eq=False)  # identity: comparing arrays elementwise means nothing here
class PackedBase:
    """``blocks`` (ceil(N/6), D, 6) float32: rows 6b..6b+5 of an (N, D) base, by dimension."""

    blocks: np.ndarray
    n: int
    # Kept with the base, and in C: handing a search to Python threads cost ~0.25 ms more per
    # search here, 10% of a 16-query search of 20k x 512. None without the kernel; the
    # threads start on first use and end with the base.
    _workers: _skinny.Workers | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        b = self.blocks  # the C kernel reads it as raw float32: check what it cannot
        if b.dtype != np.float32 or not b.flags.c_contiguous or b.ndim != 3 or b.shape[2] != ROWS:
            raise ValueError(f"packed blocks must be C-contiguous float32 (B, D, {ROWS})")
        if len(b) != -(-self.n // ROWS):
            raise ValueError(f"{len(b)} blocks cannot hold {self.n} rows")
        workers = _skinny.Workers(_cores()) if available() else None
        object.__setattr__(self, "_workers", workers)

    def __reduce__(self):
        return PackedBase, (self.blocks, self.n)  # a copy gets workers of its own

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

        Returns scores (Q, k) float32 and rows (Q, k) int64, best first and equal scores by
        lower row; rows index the packed base. Which of several rows tied at the k-th score
        are kept is not defined: callers that need it fetch a few more (`exact.exact_search`).
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), not {queries.shape}")
        if not 0 < k < self.n:  # with k >= N, rows -1 would pad the result
            raise ValueError(f"k must be in 1..{self.n - 1} for a base of {self.n} rows, not {k}")
        if self._workers is None:
            raise RuntimeError("packed kernel not built or no AVX2/FMA here: search without it")
        # Aligned too: a contiguous view at an odd byte offset is not copied by
        # ascontiguousarray, and C reads the queries as floats.
        queries = np.require(queries, np.float32, ["C_CONTIGUOUS", "ALIGNED"])
        threads = max(1, min(threads, self._workers.threads))
        scores = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        for start in range(0, len(queries), CHUNK):
            part = slice(start, start + CHUNK)  # one pass over the base per chunk of queries
            nq = min(CHUNK, len(queries) - start)
            heaps = (threads, -(-nq // GROUP) * GROUP, k)  # scratch: a set of heaps per thread
            self._workers.topk(
                self.blocks,
                self.n,
                self.dim,
                queries[part],
                nq,
                k,
                np.empty(heaps, np.float32),
                np.empty(heaps, np.int64),
                threads,
                scores[part],
                rows[part],
            )
        return scores, rows


def _cores() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one), at most 1024.

    Only as many helper threads start as searches ask for (`faiss.omp_get_max_threads()`
    from exact search, which follows OMP_NUM_THREADS)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cores or 1, 1024)
