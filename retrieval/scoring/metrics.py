"""Recall@K and ranks for cross-modal retrieval, with CLIP_benchmark's definitions. Pure arrays.

- text->image (``image_retrieval_recall@k``): for each caption, is its image among the top k
  images?
- image->text (``text_retrieval_recall@k``): for each image, is any of its captions among the
  top k captions?

Ranks are 1-based ranks of the first correct result. Ties are broken pessimistically: a
candidate with a score equal to the best correct one counts as ranked ahead of it, so equal
scores never inflate recall (all-equal scores give the worst rank, not the best).
Score matrices are computed in chunks of captions so memory stays bounded.
"""

from __future__ import annotations

import numpy as np

_CHUNK_FLOATS = 32 << 20  # floats per chunk of a score matrix
# Scores this close are equal: the same two vectors score a float32 ulp or two apart in different
# kernels (an index's and numpy's), and a tie must be a tie on every path.
TIE_TOLERANCE = 1e-6


def first_hit_ranks(scores: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """(Q,) 1-based rank of the best-scored correct candidate per query.

    ``scores``: (Q, C) similarities; ``correct``: (Q, C) bool with at least one True per row.
    Rank = 1 + number of incorrect candidates scoring >= the best correct score (less
    `TIE_TOLERANCE`).
    """
    best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    return ((scores >= best - TIE_TOLERANCE) & ~correct).sum(axis=1) + 1


def retrieval_ranks(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks in both directions.

    ``image_emb`` (I, D), ``text_emb`` (T, D): unit vectors; ``text_to_image`` (T,) int: the
    image of each caption. Returns (text->image ranks (T,), image->text ranks (I',)), where the
    image->text ranks cover only the I' images that have at least one caption.
    """
    text_to_image = np.asarray(text_to_image)
    n_img, n_txt = len(image_emb), len(text_emb)
    step = max(1, _CHUNK_FLOATS // max(n_img, 1))
    t2i = [
        first_hit_ranks(
            text_emb[s : s + step] @ image_emb.T,  # (chunk, I)
            text_to_image[s : s + step, None] == np.arange(n_img)[None, :],
        )
        for s in range(0, n_txt, step)
    ]
    captioned = np.flatnonzero(np.bincount(text_to_image, minlength=n_img) > 0)
    step = max(1, _CHUNK_FLOATS // max(n_txt, 1))
    i2t = [
        first_hit_ranks(
            image_emb[rows] @ text_emb.T,  # (chunk, T)
            rows[:, None] == text_to_image[None, :],
        )
        for rows in (captioned[s : s + step] for s in range(0, len(captioned), step))
    ]
    empty = np.zeros(0, dtype=np.int64)
    return (np.concatenate(t2i) if t2i else empty), (np.concatenate(i2t) if i2t else empty)


def recall_at_k(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
    return {k: float(np.mean(ranks <= k)) if len(ranks) else 0.0 for k in ks}


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: np.ndarray, ks=(1, 5, 10)
) -> dict[str, float]:
    """Flat dict with CLIP_benchmark's keys plus mean/median ranks."""
    t2i, i2t = retrieval_ranks(image_emb, text_emb, text_to_image)
    out: dict[str, float] = {}
    for k, v in recall_at_k(t2i, ks).items():
        out[f"image_retrieval_recall@{k}"] = v
    for k, v in recall_at_k(i2t, ks).items():
        out[f"text_retrieval_recall@{k}"] = v
    out["image_retrieval_mean_rank"] = float(t2i.mean())
    out["image_retrieval_median_rank"] = float(np.median(t2i))
    out["text_retrieval_mean_rank"] = float(i2t.mean())
    out["text_retrieval_median_rank"] = float(np.median(i2t))
    return out


def grouped_text_to_image_ranks(
    image_emb: np.ndarray, text_emb: np.ndarray, image_group: np.ndarray, text_group: np.ndarray
) -> np.ndarray:
    """(T,) text->image ranks where every image of the caption's group counts as correct.

    For corpora whose captions describe a class of images rather than one (the synthetic
    scenes: any image of "a red circle left of a blue square" answers that caption).
    ``image_group`` (I,), ``text_group`` (T,): hashable labels, compared for equality.
    """
    _, codes = np.unique(np.concatenate([image_group, text_group]), return_inverse=True)
    img_code, txt_code = codes[: len(image_group)], codes[len(image_group) :]
    step = max(1, _CHUNK_FLOATS // max(len(image_emb), 1))
    ranks = [
        first_hit_ranks(
            text_emb[s : s + step] @ image_emb.T,  # (chunk, I)
            txt_code[s : s + step, None] == img_code[None, :],
        )
        for s in range(0, len(text_emb), step)
    ]
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def listed_ranks(correct: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(Q,) ranks as `first_hit_ranks` gives them, from ranked lists of length L (an index's).

    ``correct`` (Q, L) bool, ``scores`` (Q, L) best first, -inf past a short list's end. Ties
    count against the model as in `first_hit_ranks`, whatever order the index put them in.
    A list knows only its top L, so the rank is L (a miss at every k < L) when no entry is
    correct, or when the best correct score ties the last entry: more ties may follow unseen.
    Otherwise it is exact; for a query with at most c correct candidates, recall@k is exact
    for every k <= L - c (a tie reaching the end puts at least L - c wrong ones ahead).
    """
    length = correct.shape[1]
    best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)  # (Q, 1)
    ranks = ((scores >= best - TIE_TOLERANCE) & ~correct).sum(axis=1) + 1
    known = correct.any(axis=1) & (scores[:, -1] < best[:, 0] - TIE_TOLERANCE)
    return np.where(known, ranks, length)


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """(max_k,) recall@1..max_k."""
    if not len(ranks):
        return np.zeros(max_k)
    counts = np.bincount(np.minimum(ranks, max_k + 1), minlength=max_k + 2)[1 : max_k + 1]
    return np.cumsum(counts) / len(ranks)


def top_candidates(scores: np.ndarray, correct: np.ndarray, n: int) -> np.ndarray:
    """(Q, min(n, C)) columns of each row of ``scores`` (Q, C) a second stage re-orders: the
    best first; among equal scores the incorrect (``correct`` (Q, C) False) first, then the
    lower column: pessimistic, as `first_hit_ranks` counts ties."""
    q, c = scores.shape
    order = np.lexsort((np.broadcast_to(np.arange(c), (q, c)), correct, -scores), axis=1)
    return order[:, : min(n, c)]


def reranked_ranks(
    scores: np.ndarray, correct: np.ndarray, cand: np.ndarray, logits: np.ndarray
) -> np.ndarray:
    """(Q,) 1-based rank of the best correct candidate once a second stage re-orders each
    row's candidates ``cand`` (Q, N) (`top_candidates`) by ``logits`` (Q, N).

    Ties count against the correct one, as in `first_hit_ranks`: rank = 1 + the incorrect
    candidates whose logit is >= the best correct candidate's. A row whose correct columns all
    lie outside ``cand`` keeps its first-stage rank, never better than N + 1.
    """
    hit = np.take_along_axis(correct, cand, axis=1)
    found = hit.any(axis=1)
    best = np.where(hit, logits, -np.inf).max(axis=1, keepdims=True)
    inside = ((logits >= best - TIE_TOLERANCE) & ~hit).sum(axis=1) + 1
    base = np.maximum(first_hit_ranks(scores, correct), cand.shape[1] + 1)
    return np.where(found, inside, base)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine of each row of ``a`` (N, D) to the same row of ``b`` (N, D), in float64: (N,)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-12)
