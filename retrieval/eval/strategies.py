"""Query-layer strategies scored exactly over whole embedding matrices, one bench row each.

Evaluated honestly: the querybank normalisers come from a separate bank (never the evaluation
queries), and the hybrid text->image row scores an item's captions without the query caption
itself (leave-one-out), as a real query is not one of the corpus's captions. Hybrid
image->text has no honest form on a benchmark (the query image is itself an item, so its
image->image score is always 1) and is not reported.
"""

from __future__ import annotations

import numpy as np

from ..scoring import fusion, metrics

_CHUNK = 256  # queries per chunk of the (queries x items) matrices


def qbnorm_ranks(
    image: np.ndarray,
    text: np.ndarray,
    text_to_image: np.ndarray,
    image_norm: np.ndarray,
    caption_norm: np.ndarray,
    beta: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks both ways of ``beta * s - normaliser(candidate)`` (see `retrieval.scoring.fusion`).

    The correction is an extra embedding dimension: ``[t, 1] . [beta * i, -n_i]``.
    """
    ones_t, ones_i = np.ones((len(text), 1), np.float32), np.ones((len(image), 1), np.float32)
    img_aug = np.hstack([beta * image, -image_norm[:, None]]).astype(np.float32)
    t2i, _ = metrics.retrieval_ranks(img_aug, np.hstack([text, ones_t]), text_to_image)
    cap_aug = np.hstack([text, -caption_norm[:, None] / beta]).astype(np.float32)
    _, i2t = metrics.retrieval_ranks(
        np.hstack([beta * image, beta * ones_i]), cap_aug, text_to_image
    )
    return t2i, i2t


def _item_max_leave_one_out(
    sims: np.ndarray, rows: np.ndarray, owner: np.ndarray, n_items: int
) -> np.ndarray:
    """(Q, I) best caption score per item, the query's own caption (``rows``) left out."""
    sims = sims.copy()
    sims[np.arange(len(rows)), rows] = -np.inf
    out = np.full((len(rows), n_items), -np.inf)
    order = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner[order], np.arange(n_items))
    has = np.bincount(owner, minlength=n_items) > 0
    reduced = np.maximum.reduceat(sims[:, order], starts[has], axis=1)
    out[:, has] = reduced
    return out


def hybrid_ranks(
    image: np.ndarray,
    text: np.ndarray,
    text_to_image: np.ndarray,
    mix: float,
    rrf: bool,
    item_groups: np.ndarray | None = None,
) -> np.ndarray:
    """Text->image ranks of images fused with the items' other captions (leave-one-out).

    ``item_groups`` (I,): count any item of the caption's item's group as correct (e.g. any
    image of the same synthetic scene), as `retrieval.scoring.metrics.grouped_text_to_image_ranks`.
    """
    ranks = []
    groups = np.arange(len(image)) if item_groups is None else np.asarray(item_groups)
    for s in range(0, len(text), _CHUNK):
        rows = np.arange(s, min(s + _CHUNK, len(text)))
        fused = hybrid_scores(image, text, text_to_image, (mix, rrf), rows)
        correct = groups[text_to_image[rows], None] == groups[None, :]
        ranks.append(metrics.first_hit_ranks(fused, correct))
    return np.concatenate(ranks)


def hybrid_scores(
    image: np.ndarray, text: np.ndarray, text_to_image: np.ndarray, how, rows: np.ndarray
) -> np.ndarray:
    """(len(rows), I) fused text->image scores of captions ``rows`` (``how``: (mix, rrf)),
    each item's captions scored without the query caption itself."""
    mix, rrf = how
    t2i = (text[rows] @ image.T).astype(np.float64)  # (chunk, I)
    t2t = _item_max_leave_one_out(text[rows] @ text.T, rows, text_to_image, len(image))
    t2t = np.where(np.isfinite(t2t), t2t, np.nan)
    weights = {"t2i": 1 - mix, "t2t": mix}
    return np.array(
        [
            fusion.fuse_signals({"t2i": a, "t2t": b}, weights, rrf)
            for a, b in zip(t2i, t2t, strict=True)
        ]
    )
