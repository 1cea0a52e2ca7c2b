"""What each epoch trains on: the pairs, their order and batches, and the image views.

By default an epoch visits every training image once, with one of its captions drawn from
(seed, epoch). With ``all_captions`` it visits every (image, caption) pair instead, so an image
can sit in a batch more than once; its captions are then positives of each other's images
(`retrieval.train.loss.positive_mask` on (caption id, item) pairs), never negatives. With
``views`` > 1 each image shows one of its augmented views (`retrieval.train.augment`), drawn per
epoch. Everything is a function of (seed, epoch), so a resumed run sees the batches an
uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def epoch_batches(
    n: int, epoch: int, seed: int, size: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, size) item indices of each step, and one caption draw (n,) per item; last drops.

    ``groups`` (n,) int: items of one group are laid out next to each other (groups and the
    items within each in random order), so they share a batch unless a boundary splits them.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    draws = rng.random(n)
    if groups is not None:
        rank = rng.permutation(int(groups.max()) + 1 if n else 0)[groups[order]]
        order = order[np.argsort(rank, kind="stable")]
    steps = n // size
    return order[: steps * size].reshape(steps, size), draws


@dataclass(frozen=True)
class Epoch:
    """``batches`` (steps, size) pair indices; pair p is item ``items[p]`` with caption row
    ``caps[p]``; ``views`` (N,) the view each item shows (None: no augmentation)."""

    batches: np.ndarray
    items: np.ndarray
    caps: np.ndarray
    views: np.ndarray | None


def pair_count(caption_rows: Sequence[np.ndarray], all_captions: bool) -> int:
    return sum(map(len, caption_rows)) if all_captions else len(caption_rows)


def plan(
    caption_rows: Sequence[np.ndarray],
    groups: np.ndarray | None,
    epoch: int,
    seed: int,
    size: int,
    all_captions: bool = False,
    views: int = 1,
) -> Epoch:
    """Epoch ``epoch``'s batches of ``size`` pairs over the items whose captions are
    ``caption_rows`` (item i: rows ``caption_rows[i]``)."""
    n = len(caption_rows)
    if all_captions:
        items = np.repeat(np.arange(n), [len(r) for r in caption_rows])
        caps = np.concatenate(caption_rows) if n else np.zeros(0, np.int64)
        pair_groups = groups[items] if groups is not None else None
        batches, _ = epoch_batches(len(items), epoch, seed, size, pair_groups)
    else:
        items = np.arange(n)
        batches, draws = epoch_batches(n, epoch, seed, size, groups)
        caps = np.array([r[int(d * len(r))] for r, d in zip(caption_rows, draws, strict=True)])
    shown = None
    if views > 1:  # drawn apart from the order, so the order is the same with and without
        shown = np.random.default_rng([seed, epoch, 4242]).integers(0, views, n)
    return Epoch(batches, items, caps.astype(np.int64), shown)
