"""Fusion functions against hand-computed examples. Pure arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retrieval.scoring import fusion


def test_logsumexp_is_stable_and_ignores_padding():
    x = np.array([[1000.0, 1000.0], [0.0, -np.inf]])
    np.testing.assert_allclose(fusion.logsumexp(x, axis=1), [1000 + math.log(2), 0.0])


def test_querybank_normalisation_demotes_a_hub():
    # Candidate 0 is a hub: close to every bank query. Candidate 1 is close to few.
    bank = np.array([[0.9, 0.8, 0.85], [0.3, 0.2, 0.1]])
    beta = 10.0
    n = fusion.bank_normalisers(bank, beta)
    assert n[0] == pytest.approx(math.log(math.exp(9) + math.exp(8) + math.exp(8.5)))
    assert n[1] == pytest.approx(math.log(math.exp(3) + math.exp(2) + math.exp(1)))
    raw = np.array([0.6, 0.55])  # the hub wins on cosine ...
    corrected = fusion.querybank_scores(raw, n, beta)
    assert corrected.tolist() == pytest.approx([6 - n[0], 5.5 - n[1]])
    assert corrected[1] > corrected[0]  # ... and loses once normalised


def test_minmax_and_weighted_sum_with_missing_scores():
    np.testing.assert_allclose(fusion.minmax(np.array([2.0, 4.0, 3.0])), [0, 1, 0.5])
    np.testing.assert_allclose(fusion.minmax(np.array([5.0, 5.0])), [1, 1])
    signals = {"a": np.array([0.2, 0.4, 0.3]), "b": np.array([10.0, np.nan, 20.0])}
    fused = fusion.weighted_sum(signals, {"a": 0.5, "b": 2.0})
    # a -> [0, 1, .5] * .5 ; b -> [0, missing=0, 1] * 2
    np.testing.assert_allclose(fused, [0.0, 0.5, 2.25])


def test_reciprocal_rank_fusion_k60():
    signals = {"a": np.array([0.9, 0.5, 0.7]), "b": np.array([0.1, 0.3, np.nan])}
    fused = fusion.reciprocal_rank_fusion(signals, {"a": 1.0, "b": 1.0})
    want = [1 / 61 + 1 / 62, 1 / 63 + 1 / 61, 1 / 62 + 0.0]
    np.testing.assert_allclose(fused, want)
    assert fusion.ranks_of(np.array([3.0, 3.0, 1.0])).tolist() == [1, 1, 3]


def test_top_k_breaks_ties_by_position():
    assert fusion.top_k(np.array([0.5, 0.9, 0.5, 0.9]), 3).tolist() == [1, 3, 0]
