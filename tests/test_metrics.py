"""Recall@K and ranks against a plain, obviously-correct reference. No models."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval import metrics


def reference(image_emb, text_emb, text_to_image, ks):
    """Loops and sorted lists; ties pessimistic (an equal incorrect score ranks first)."""
    scores = text_emb @ image_emb.T
    out = {}
    t2i_ranks = []
    for t in range(len(text_emb)):
        mine = scores[t, text_to_image[t]]
        t2i_ranks.append(
            1
            + sum(
                1 for i in range(len(image_emb)) if i != text_to_image[t] and scores[t, i] >= mine
            )
        )
    i2t_ranks = []
    for i in range(len(image_emb)):
        caps = [t for t in range(len(text_emb)) if text_to_image[t] == i]
        if not caps:
            continue
        best = max(scores[t, i] for t in caps)
        i2t_ranks.append(
            1
            + sum(1 for t in range(len(text_emb)) if text_to_image[t] != i and scores[t, i] >= best)
        )
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = np.mean([r <= k for r in t2i_ranks])
        out[f"text_retrieval_recall@{k}"] = np.mean([r <= k for r in i2t_ranks])
    out["image_retrieval_median_rank"] = float(np.median(t2i_ranks))
    out["text_retrieval_mean_rank"] = float(np.mean(i2t_ranks))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_with_several_captions_and_ties(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    n_img = 13
    text_to_image = np.concatenate([np.arange(n_img - 1), rng.integers(0, n_img - 1, 30)])
    # Coarse values make many exact ties; the last image has no caption at all.
    image_emb = rng.integers(-2, 3, (n_img, 4)).astype(np.float32)
    text_emb = rng.integers(-2, 3, (len(text_to_image), 4)).astype(np.float32)
    monkeypatch.setattr(metrics, "_CHUNK_FLOATS", 40)  # force many small chunks
    got = metrics.retrieval_metrics(image_emb, text_emb, text_to_image, ks=(1, 2, 5, 10))
    want = reference(image_emb, text_emb, text_to_image, (1, 2, 5, 10))
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_all_equal_scores_give_the_worst_rank_not_the_best():
    t2i, i2t = metrics.retrieval_ranks(
        np.ones((5, 2), np.float32), np.ones((5, 2), np.float32), np.arange(5)
    )
    assert t2i.tolist() == [5] * 5 and i2t.tolist() == [5] * 5


def test_perfect_embeddings_have_rank_one():
    e = np.eye(6, dtype=np.float32)
    m = metrics.retrieval_metrics(e, e[[0, 1, 2, 3, 4, 5, 0]], np.array([0, 1, 2, 3, 4, 5, 0]))
    assert m["image_retrieval_recall@1"] == 1.0 and m["text_retrieval_recall@1"] == 1.0


def test_grouped_ranks_count_any_image_of_the_group():
    image_emb = np.eye(4, dtype=np.float32)
    text_emb = np.array([[0, 0.9, 0.5, 0], [0.2, 0, 0, 0.9]], dtype=np.float32)
    groups = np.array(["a", "b", "a", "c"])
    ranks = metrics.grouped_text_to_image_ranks(image_emb, text_emb, groups, np.array(["a", "c"]))
    # text 0: best "a" image is #2 (0.5), beaten by image 1 (0.9) -> rank 2; text 1: rank 1.
    assert ranks.tolist() == [2, 1]


def test_first_correct_ranks_and_curves():
    correct = np.array([[False, True, True], [False, False, False], [True, False, False]])
    ranks = metrics.first_correct_ranks(correct)
    assert ranks.tolist() == [2, 4, 1]
    np.testing.assert_allclose(metrics.recall_curve(ranks, 3), [1 / 3, 2 / 3, 2 / 3])
