"""Exact top-k by inner product over a matrix of vectors, ties broken by lower id.

The reference every approximate index is measured against, and the search of exact (flat)
indexes. Through BLAS at every batch size: FAISS's own flat search only switches to BLAS at
nq * d >= ``distance_compute_blas_threshold`` (250 queries at d=512) and is several times
slower below it. With a `packed.PackedBase` of the vectors, batches of 16 queries and more go
through the packed kernel instead, at ~75-110% of GEMM throughput (`retrieval/index/packed.py`).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from .packed import PackedBase

_TILED_LOCK = threading.Lock()  # guards FAISS's process-wide BLAS switch (`_tiled_blas`)
_SCORE_BUDGET = 64 << 20  # floats per chunk of the (queries x vectors) score matrix
_BLAS_ULPS = 1e-6  # equal vectors' scores can differ by an ulp or two between BLAS tiles
# From this many queries up, exact search is FAISS's tiled BLAS search, also below FAISS's own
# switch to it: BLAS copies ("packs") its operands into tiles first, and FAISS's tiles of
# 1,024 vectors stay in cache where one product over all N goes out to memory and back, and
# no (Q, N) score matrix is written (the fallback row of "Search speed", benchmarks/README.md).
TILED_MIN_QUERIES = 16


@dataclass(frozen=True)
class Neighbors:
    """One query's results: ``ids`` (k',) int64 and ``scores`` (k',) float32, best first."""

    ids: np.ndarray
    scores: np.ndarray


def exact_search(
    xb: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    k: int,
    packed: PackedBase | None = None,
) -> list[Neighbors]:
    """Exact top-``k`` by inner product of ``queries`` (Q, D) against ``xb`` (N, D).

    ``packed``: ``xb`` packed for the skinny-product kernel (`PackedBase.pack`); used from
    `TILED_MIN_QUERIES` queries up.

    Fewer than `TILED_MIN_QUERIES`: one BLAS product per chunk of queries, then a partial top-k
    selection (torch's, several times faster than numpy's partition on wide rows); chunks keep
    the (chunk, N) score matrix within a fixed memory budget. More: FAISS's tiled BLAS search,
    which never materialises the matrix. (FAISS's own flat search runs batches below
    ``distance_compute_blas_threshold`` = nq x d without BLAS, several times slower.) Both
    fetch a few more than ``k`` and break ties by lower id, also at the cut-off, so results
    are deterministic.
    """
    n = xb.shape[0]
    k = min(k, n)
    spare = min(n, k + 8)  # a few more than k, to see ties at the cut-off without a full scan
    tiled = len(queries) >= TILED_MIN_QUERIES
    if (tiled or queries.size >= faiss.cvar.distance_compute_blas_threshold) and n > spare:
        if packed is not None and tiled and packed.n == n:
            top_scores, top_idx = packed.top(queries, spare, faiss.omp_get_max_threads())
        else:
            with _tiled_blas():
                top_scores, top_idx = faiss.knn(
                    queries, xb, spare, metric=faiss.METRIC_INNER_PRODUCT
                )
        return _batch_neighbors(xb, ids, queries, top_scores, top_idx, k)
    step = max(1, _SCORE_BUDGET // max(n, 1))
    out: list[Neighbors] = []
    for start in range(0, len(queries), step):
        scores = _scores(xb, queries[start : start + step])  # (chunk, N)
        top_scores, top_idx = torch.topk(scores, spare, dim=1)  # (chunk, spare), sorted
        for row, vals, idx in zip(scores, top_scores.numpy(), top_idx.numpy(), strict=True):
            out.append(_neighbors(ids, vals, idx, k, spare < n, row.numpy, tol=_BLAS_ULPS))
    return out


def _scores(xb: np.ndarray, queries: np.ndarray) -> torch.Tensor:
    """(Q, N) inner products of a few ``queries`` (Q, D) with ``xb`` (N, D)."""
    base, qs = torch.from_numpy(xb), torch.from_numpy(queries)
    # Skinny products run faster in BLAS as (N, D) x (D, Q) than (Q, D) x (D, N).
    return (base @ qs.T).T.contiguous()


@contextlib.contextmanager
def _tiled_blas():
    """FAISS's flat search through BLAS at any batch size, for the duration of one search.

    FAISS keeps that switch in one process-wide variable, so it is set and put back under a
    lock. A FAISS search elsewhere in the process meanwhile may take BLAS too: it gets the
    same neighbours, at a different speed.
    """
    with _TILED_LOCK:
        saved = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 0
        try:
            yield
        finally:
            faiss.cvar.distance_compute_blas_threshold = saved


def _batch_neighbors(xb, ids, queries, top_scores, top_idx, k: int) -> list[Neighbors]:
    """`_neighbors` for a batch: each query's ``k`` best of its (Q, spare) candidates (best
    first, fewer than N), ordered in one vectorised sort; only queries whose candidates end
    on a possible tie with their k-th best go through `_neighbors` one by one."""
    cand_ids = ids[top_idx]  # (Q, spare)
    order = np.lexsort((cand_ids, -top_scores))[:, :k]  # by score, then lower id
    best_ids = np.take_along_axis(cand_ids, order, 1).astype(np.int64)
    best_scores = np.take_along_axis(top_scores, order, 1).astype(np.float32)
    out = [Neighbors(i, s) for i, s in zip(best_ids, best_scores, strict=True)]
    for r in np.flatnonzero(top_scores[:, -1] >= top_scores[:, k - 1] - _BLAS_ULPS):
        q = queries[r]
        out[r] = _neighbors(ids, top_scores[r], top_idx[r], k, True, lambda q=q: xb @ q, _BLAS_ULPS)
    return out


def _neighbors(ids, vals, idx, k: int, partial: bool, full_row, tol: float = 0.0) -> Neighbors:
    """The ``k`` best of one query's candidates (``vals``, ``idx``: best first), ties by lower id.

    When the candidates end on a tie with the k-th score (``partial``: they are not all the
    vectors), the tie may run past them: then ``full_row()`` gives the query's (N,) scores and
    every vector at or above its k-th best score is considered. ``tol``: scores this close to
    the cut count as possible ties (tiled BLAS may round equal vectors' scores differently).
    """
    cut = vals[k - 1]
    if partial and vals[-1] >= cut - tol:
        row = full_row()
        cut = np.partition(row, len(row) - k)[len(row) - k]  # the k-th best, from the row itself
        idx = np.flatnonzero(row >= cut)
        vals = row[idx]
    keep = vals >= cut
    idx, vals = idx[keep], vals[keep]
    order = np.lexsort((ids[idx], -vals))[:k]
    return Neighbors(ids[idx[order]].astype(np.int64), vals[order].astype(np.float32))
