"""Recall@K and ranks against a plain, obviously-correct reference. No models."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.scoring import metrics


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
                1
                for i in range(len(image_emb))
                if i != text_to_image[t] and scores[t, i] >= mine - metrics.TIE_TOLERANCE
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
            + sum(
                1
                for t in range(len(text_emb))
                if text_to_image[t] != i and scores[t, i] >= best - metrics.TIE_TOLERANCE
            )
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


def test_listed_ranks_match_full_ranks_with_ties_in_any_list_order():
    rng = np.random.default_rng(7)
    for q, c, length, levels in [(50, 23, 7, 4), (31, 9, 9, 4), (40, 64, 20, 16)]:
        scores = rng.integers(0, levels, size=(q, c)).astype(np.float32)  # many ties
        correct = rng.random((q, c)) < 0.15
        correct[np.arange(q), rng.integers(0, c, q)] = True
        full = metrics.first_hit_ranks(scores, correct)
        # An index's list: best first, ties in an arbitrary order (here: random).
        order = np.lexsort((rng.random((q, c)), -scores))[:, :length]
        listed = metrics.listed_ranks(
            np.take_along_axis(correct, order, 1), np.take_along_axis(scores, order, 1)
        )
        last = np.take_along_axis(scores, order, 1)[:, -1]
        best = np.where(correct, scores, -np.inf).max(axis=1)
        open_end = last >= best  # a tie that may run past the list: counted as a miss
        np.testing.assert_array_equal(listed[~open_end], np.minimum(full, length)[~open_end])
        assert (listed[open_end] == length).all() and (~open_end).sum() > q // 4


def test_lists_with_room_for_every_correct_one_give_exact_recall_up_to_max_k():
    rng = np.random.default_rng(11)
    for q, c_all, max_k in [(200, 30, 5), (200, 12, 3)]:
        scores = rng.integers(0, 3, size=(q, c_all)).astype(np.float32)
        correct = rng.random((q, c_all)) < 0.2  # several correct ones, often tied
        correct[np.arange(q), rng.integers(0, c_all, q)] = True
        room = int(correct.sum(axis=1).max())
        order = np.lexsort((rng.random((q, c_all)), -scores))[:, : max_k + room]
        listed = metrics.listed_ranks(
            np.take_along_axis(correct, order, 1), np.take_along_axis(scores, order, 1)
        )
        full = metrics.first_hit_ranks(scores, correct)
        cut = max_k + 1  # every rank past max_k is the same miss
        np.testing.assert_array_equal(np.minimum(listed, cut), np.minimum(full, cut))


def test_scores_a_float_ulp_apart_are_a_tie_on_both_paths():
    # FAISS scored two copies of one caption vector 0.93865871 and 0.93865865 (one ulp apart).
    scores = np.array([[0.9386587142944336, 0.9386586546897888]], dtype=np.float32)
    for correct in (np.array([[True, False]]), np.array([[False, True]])):
        assert metrics.first_hit_ranks(scores, correct).tolist() == [2]
        listed = np.c_[correct, [[False]]], np.c_[scores, [[0.1]]]  # a list of 3, best first
        assert metrics.listed_ranks(*listed).tolist() == [2]


def test_listed_ranks_of_short_lists_and_curves():
    correct = np.array([[False, True, False], [False, False, False], [True, False, False]])
    scores = np.array([[0.9, 0.8, -np.inf], [0.7, 0.6, 0.5], [0.9, 0.9, 0.1]])
    ranks = metrics.listed_ranks(correct, scores)
    assert ranks.tolist() == [2, 3, 2]  # row 3: the tie with 0.9 counts against it
    np.testing.assert_allclose(metrics.recall_curve(ranks, 2), [0, 2 / 3])
