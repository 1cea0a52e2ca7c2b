"""Strategy rows of the benchmark against plain loops. Pure arrays."""

from __future__ import annotations

import numpy as np

from retrieval.eval import strategies
from retrieval.scoring import fusion, metrics


def data(seed=0, n_img=9, per=3, d=6):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((n_img, d)).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    owner = np.repeat(np.arange(n_img), per)
    text = image[owner] + 0.8 * rng.standard_normal((len(owner), d)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return image, text, owner


def test_qbnorm_ranks_equal_ranks_of_the_corrected_matrix():
    image, text, owner = data()
    rng = np.random.default_rng(1)
    n_img, n_cap, beta = rng.random(len(image)) * 3, rng.random(len(text)) * 3, 7.0
    t2i, i2t = strategies.qbnorm_ranks(image, text, owner, n_img, n_cap, beta)
    s = text @ image.T  # (T, I)
    want_t2i = metrics.first_hit_ranks(
        beta * s - n_img[None, :], owner[:, None] == np.arange(len(image))[None, :]
    )
    want_i2t = metrics.first_hit_ranks(
        (beta * s - n_cap[:, None]).T, np.arange(len(image))[:, None] == owner[None, :]
    )
    np.testing.assert_array_equal(t2i, want_t2i)
    np.testing.assert_array_equal(i2t, want_i2t)


def test_hybrid_ranks_leave_the_query_caption_out():
    image, text, owner = data(seed=2)
    for rrf in (False, True):
        got = strategies.hybrid_ranks(image, text, owner, 0.4, rrf)
        want = []
        for q in range(len(text)):
            t2i = text[q] @ image.T
            t2t = np.array(
                [
                    max(
                        (text[q] @ text[c] for c in range(len(text)) if owner[c] == i and c != q),
                        default=np.nan,
                    )
                    for i in range(len(image))
                ]
            )
            signals, w = {"a": t2i, "b": t2t}, {"a": 0.6, "b": 0.4}
            fused = (
                fusion.reciprocal_rank_fusion(signals, w)
                if rrf
                else fusion.weighted_sum(signals, w)
            )
            want.append(
                1 + sum(fused[i] >= fused[owner[q]] for i in range(len(image)) if i != owner[q])
            )
        np.testing.assert_array_equal(got, want)


def test_grouped_hybrid_ranks_count_any_item_of_the_group():
    image, text, owner = data(seed=4, n_img=8)
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    got = strategies.hybrid_ranks(image, text, owner, 0.3, False, item_groups=groups)
    plain = strategies.hybrid_ranks(image, text, owner, 0.3, False)
    assert (got <= plain).all() and (got < plain).any()
    # Rank 1 exactly when the best fused item is in the caption's group.
    same = np.array(
        strategies.hybrid_ranks(image, text, owner, 0.3, False, item_groups=np.zeros(8))
    )
    assert (same == 1).all()
