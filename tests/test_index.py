from __future__ import annotations

import faiss
import numpy as np
import pytest
from conftest import unit_rows

from retrieval.errors import IndexBuildError
from retrieval.index import exact
from retrieval.index.exact import exact_search
from retrieval.index.vector_index import VectorIndex, choose_factory


def brute_force(xb, ids, q, k):
    s = q @ xb.T
    out = []
    for row in s:
        order = sorted(range(len(row)), key=lambda j: (-row[j], ids[j]))[:k]
        out.append((ids[order], row[order]))
    return out


@pytest.mark.parametrize(("n", "nq", "k"), [(1, 1, 5), (7, 3, 7), (1001, 17, 10), (257, 5, 300)])
def test_flat_matches_brute_force_on_awkward_sizes(n, nq, k):
    xb, q = unit_rows(n, 24, seed=n), unit_rows(nq, 24, seed=n + 1)
    ids = np.random.default_rng(n).permutation(n).astype(np.int64) * 3 + 5
    got = VectorIndex.build(xb, ids, "Flat").search(q, k)
    for nb, (want_ids, want_scores) in zip(got, brute_force(xb, ids, q, k), strict=True):
        np.testing.assert_array_equal(nb.ids, want_ids)
        np.testing.assert_allclose(nb.scores, want_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "k"), [(1001, 10), (37, 30)])
def test_large_batches_take_faiss_blas_path_and_still_match_brute_force(n, k):
    d, nq = 512, 251  # nq * d just past FAISS's BLAS threshold (128,000)
    assert nq * d >= faiss.cvar.distance_compute_blas_threshold
    xb, q = unit_rows(n, d, seed=7), unit_rows(nq, d, seed=8)
    ids = np.random.default_rng(9).permutation(n).astype(np.int64) * 7 + 1
    got = exact_search(xb, ids, q, k)
    for nb, (want_ids, want_scores) in zip(got, brute_force(xb, ids, q, k), strict=True):
        np.testing.assert_array_equal(nb.ids, want_ids)
        np.testing.assert_allclose(nb.scores, want_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "nq", "k"), [(3_075, 17, 10), (1_025, 16, 3), (2_049, 200, 25)])
def test_tiled_batches_below_faiss_threshold_match_brute_force(n, nq, k):
    assert nq >= exact.TILED_MIN_QUERIES
    assert nq * 24 < faiss.cvar.distance_compute_blas_threshold
    xb, q = unit_rows(n, 24, seed=n), unit_rows(nq, 24, seed=n + 1)
    ids = np.random.default_rng(n).permutation(n).astype(np.int64) * 2 + 1
    got = exact_search(xb, ids, q, k)
    for nb, (want_ids, want_scores) in zip(got, brute_force(xb, ids, q, k), strict=True):
        np.testing.assert_array_equal(nb.ids, want_ids)
        np.testing.assert_allclose(nb.scores, want_scores, rtol=1e-5, atol=1e-6)


def test_tiled_search_breaks_ties_by_lower_id_across_tiles():
    xb = np.repeat(unit_rows(3, 16, seed=6), [1500, 1500, 1001], axis=0)  # ties span blocks
    ids = np.random.default_rng(7).permutation(len(xb)).astype(np.int64)
    threshold = faiss.cvar.distance_compute_blas_threshold
    got = exact_search(xb, ids, np.repeat(xb[:1], 20, axis=0), 4)
    want = sorted(ids[:1500].tolist())[:4]
    assert all(nb.ids.tolist() == want for nb in got)
    assert faiss.cvar.distance_compute_blas_threshold == threshold  # FAISS's switch put back


def test_large_batches_break_ties_by_id_past_the_margin():
    xb = np.repeat(unit_rows(3, 512, seed=2), [40, 40, 40], axis=0)
    ids = np.random.default_rng(3).permutation(120).astype(np.int64)
    got = exact_search(xb, ids, np.repeat(xb[:1], 300, axis=0), 5)
    want = sorted(ids[:40].tolist())[:5]
    assert all(nb.ids.tolist() == want for nb in got)


def test_ties_are_broken_by_lower_id_even_at_the_cut_off():
    xb = np.repeat(unit_rows(2, 8), [5, 5], axis=0)  # two groups of five identical vectors
    ids = np.array([9, 3, 7, 1, 5, 8, 2, 6, 0, 4], dtype=np.int64)
    [nb] = exact_search(xb, ids, xb[:1], 3)
    assert nb.ids.tolist() == [1, 3, 5]


def test_ann_indexes_find_most_true_neighbours_and_never_return_padding():
    # Clustered, like real embeddings: isotropic noise has no neighbourhoods to find.
    centres = unit_rows(30, 32, seed=1)
    xb = centres[np.arange(3000) % 30] + 0.3 * unit_rows(3000, 32, seed=2)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    q = xb[:50] + 0.05 * unit_rows(50, 32, seed=3)
    exact = VectorIndex.build(xb, np.arange(3000), "Flat").search(q, 10)
    for factory in ("HNSW32", "HNSW32,SQfp16", "IVF32,Flat", "IVF32,SQfp16"):
        ann = VectorIndex.build(xb, np.arange(3000), factory).search(q, 10)
        recall = np.mean(
            [len(set(a.ids) & set(e.ids)) / 10 for a, e in zip(ann, exact, strict=True)]
        )
        assert recall > 0.8, factory
        assert all((a.ids >= 0).all() for a in ann)


def test_save_load_roundtrip_and_small_k(tmp_path):
    xb = unit_rows(20, 16)
    index = VectorIndex.build(xb, np.arange(20) + 100, "Flat")
    index.save(tmp_path / "x.faiss")
    loaded = VectorIndex.load(tmp_path / "x.faiss", "Flat")
    assert loaded.ntotal == 20 and loaded.dim == 16
    assert loaded.search(xb[3:4], 1)[0].ids.tolist() == [103]
    assert loaded.search(xb[:2], 0)[0].ids.size == 0


def test_empty_index_returns_nothing():
    index = VectorIndex.build(np.zeros((0, 8), np.float32), np.zeros(0), "Flat")
    assert index.search(unit_rows(2, 8), 5)[1].ids.size == 0


def test_bad_factory_and_untrainable_index_are_clear_errors():
    xb = unit_rows(10, 8)
    with pytest.raises(IndexBuildError, match="bad FAISS factory string"):
        VectorIndex.build(xb, np.arange(10), "NoSuchIndex")
    with pytest.raises(IndexBuildError, match="cannot train 'IVF1024,Flat' on 10 vectors"):
        VectorIndex.build(xb, np.arange(10), "IVF1024,Flat")


def test_auto_choice_is_exact_for_small_corpora():
    assert choose_factory(5) == "Flat"
    assert choose_factory(10**6) != "Flat"


def test_ties_beyond_the_top_k_margin_are_still_broken_by_id():
    xb = np.repeat(unit_rows(1, 8), 40, axis=0)  # forty identical vectors
    ids = np.random.default_rng(0).permutation(40).astype(np.int64) + 100
    [nb] = exact_search(xb, ids, xb[:1], 3)
    assert nb.ids.tolist() == [100, 101, 102]


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,Flat"])
@pytest.mark.parametrize("n_allowed", [3, 25_000])
def test_allowed_ids_restrict_results_exactly_when_selective(factory, n_allowed):
    n = 30_000 if n_allowed > 3 else 2000
    xb = unit_rows(n, 16, seed=5)
    ids = np.arange(n, dtype=np.int64) * 2
    index = VectorIndex.build(xb, ids, factory)
    allowed = np.sort(np.random.default_rng(1).choice(ids, n_allowed, replace=False))
    got = index.search(xb[:4], 10, allowed=allowed)
    keep = np.isin(ids, allowed)
    want = exact_search(xb[keep], ids[keep], xb[:4], 10)
    for g, w in zip(got, want, strict=True):
        assert set(g.ids) <= set(allowed.tolist())
        if n_allowed <= 20_000 or factory == "Flat":
            assert g.ids.tolist() == w.ids.tolist()
        else:  # broad filters go through FAISS's selector: approximate, but mostly right
            assert len(set(g.ids) & set(w.ids)) >= 5


@pytest.mark.parametrize(
    "factory", ["Flat", "HNSW16", "HNSW16,SQfp16", "IVF16,Flat", "IVF16,SQfp16", "IVF16,PQ8x4"]
)
def test_memory_mapped_indexes_answer_like_loaded_ones(tmp_path, factory):
    xb, q = unit_rows(1500, 32, seed=1), unit_rows(37, 32, seed=2)
    ids = np.arange(1500) * 3 + 5
    VectorIndex.build(xb, ids, factory).save(tmp_path / "x.faiss")
    loaded = VectorIndex.load(tmp_path / "x.faiss", factory)
    mapped = VectorIndex.load(tmp_path / "x.faiss", factory, mmap=True)
    for a, b in zip(loaded.search(q, 10), mapped.search(q, 10), strict=True):
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    mapped.exclude(ids[:700])
    assert not any(np.isin(n.ids, ids[:700]).any() for n in mapped.search(q, 10))
    empty = VectorIndex.build(np.zeros((0, 8), np.float32), np.zeros(0), "Flat")
    empty.save(tmp_path / "e.faiss")
    assert (
        VectorIndex.load(tmp_path / "e.faiss", "Flat", mmap=True).search(q[:1, :8], 3)[0].ids.size
        == 0
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("nq", [1, 16])
def test_queries_with_nan_or_inf_are_refused(bad, nq):
    # A NaN score never enters a top-k: such a query would come back short, or with padding.
    index = VectorIndex.build(unit_rows(9_000, 8, seed=1), np.arange(9_000), "Flat")
    q = unit_rows(nq, 8, seed=2)
    q[-1, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(q, 5)
