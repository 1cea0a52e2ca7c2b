"""Score fusion for the query layer. Pure arrays: no models, indexes or stores.

- Querybank normalisation (Bogolin et al., "Cross Modal Retrieval with Querybank
  Normalisation", CVPR 2022; the inverted softmax of Smith et al., 2017): a "hub" candidate
  that sits close to many queries gets its score lowered by how strongly it attracts a bank of
  queries. In the log domain, with temperature ``beta`` and the candidate's ``m`` most similar
  bank queries, ``score' = beta * s(q, c) - log sum_b exp(beta * s(b, c))``.
- Per-signal normalisation and weighted sums, and reciprocal-rank fusion (Cormack et al., 2009,
  ``sum_s w_s / (k + rank_s)``, k=60), to fuse several signals into one score per item.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

RRF_K = 60


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log(sum(exp(x))) along ``axis``; -inf entries (padding) contribute nothing."""
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis) + np.log(np.sum(np.exp(x - top), axis=axis))


def bank_normalisers(bank_scores: np.ndarray, beta: float) -> np.ndarray:
    """(C,) normaliser per candidate from ``bank_scores`` (C, m), its top-m bank similarities."""
    return logsumexp(beta * np.asarray(bank_scores, dtype=np.float64), axis=1)


def querybank_scores(scores: np.ndarray, normalisers: np.ndarray, beta: float) -> np.ndarray:
    """Corrected scores of candidates: ``beta * scores - normalisers`` (same shapes)."""
    return beta * np.asarray(scores, dtype=np.float64) - np.asarray(normalisers, dtype=np.float64)


def minmax(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] over the candidates; all-equal values map to 1 (nothing to prefer)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    lo, hi = v.min(), v.max()
    return np.ones_like(v) if hi - lo <= 1e-12 else (v - lo) / (hi - lo)


def weighted_sum(
    signals: Mapping[str, np.ndarray], weights: Mapping[str, float], missing: float = 0.0
) -> np.ndarray:
    """Sum of min-max-normalised signals, each (N,) over the same N items, times its weight.

    NaN marks an item a signal has no score for; it counts as ``missing`` (0 = that signal's
    worst candidate).
    """
    total = None
    for name, values in signals.items():
        v = np.asarray(values, dtype=np.float64)
        known = ~np.isnan(v)
        norm = np.full(v.shape, missing)
        norm[known] = minmax(v[known])
        part = weights.get(name, 1.0) * norm
        total = part if total is None else total + part
    return total if total is not None else np.zeros(0)


def ranks_of(values: np.ndarray) -> np.ndarray:
    """1-based ranks, best (largest) first; ties share the better rank; NaN ranks last (inf)."""
    v = np.asarray(values, dtype=np.float64)
    out = np.full(v.shape, np.inf)
    known = ~np.isnan(v)
    kv = v[known]
    ascending = np.sort(kv)
    # rank = 1 + how many values are strictly larger
    out[known] = 1 + len(kv) - np.searchsorted(ascending, kv, side="right")
    return out


def reciprocal_rank_fusion(
    signals: Mapping[str, np.ndarray], weights: Mapping[str, float], k: int = RRF_K
) -> np.ndarray:
    """``sum_s w_s / (k + rank_s(item))`` over signals, each (N,) scores of the same items."""
    total = None
    for name, values in signals.items():
        part = weights.get(name, 1.0) / (k + ranks_of(values))
        total = part if total is None else total + part
    return total if total is not None else np.zeros(0)


def fuse_signals(
    signals: Mapping[str, np.ndarray], weights: Mapping[str, float], rrf: bool = False
) -> np.ndarray:
    """The hybrid strategies' one score per item from several signals, each (N,).

    ``rrf``: reciprocal-rank fusion; else the weighted sum of min-max-normalised scores. NaN
    marks an item a signal has no score for (it counts as that signal's worst); an item no
    signal scores is NaN. The query layer and the benchmark's strategy rows both fuse here.
    """
    fused = reciprocal_rank_fusion(signals, weights) if rrf else weighted_sum(signals, weights)
    if signals:
        unscored = np.logical_and.reduce([np.isnan(np.asarray(v)) for v in signals.values()])
        fused[unscored] = np.nan
    return fused


def top_k(item_scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best scores, best first; ties keep the lower index first."""
    order = np.lexsort((np.arange(len(item_scores)), -np.asarray(item_scores)))
    return order[:k]
