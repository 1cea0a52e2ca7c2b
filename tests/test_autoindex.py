"""Index choice by size and memory budget; search knobs tuned to a recall target."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from retrieval.errors import IndexBuildError
from retrieval.index import autoindex, layout
from retrieval.index.autoindex import bytes_per_vector, choose, nlist_for, tune
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.index.exact import exact_search
from retrieval.index.manifest import read_manifest
from retrieval.index.vector_index import VectorIndex
from retrieval.index.verify import verify
from retrieval.query.search import Query, Searcher

MIB = 2**20


def clustered(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Unit vectors around 64 shared centres; ``shift`` moves them all one way (a modality
    gap, as between image and caption embeddings)."""
    centres = np.random.default_rng(99).standard_normal((64, d)).astype(np.float32)
    gap = np.random.default_rng(98).standard_normal(d).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, 64, n)] + 0.7 * rng.standard_normal((n, d)).astype(np.float32)
    x += shift * gap / np.linalg.norm(gap) * np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_choice_follows_size_then_budget():
    assert choose(50_000, 512).factory == "Flat"
    assert choose(1_000_000, 512).factory == "HNSW32,SQfp16"
    assert not autoindex.compressed("HNSW32,SQfp16")  # fp16: the precision of the store
    assert autoindex.compressed("IVF64,SQ8") and autoindex.compressed("OPQ64,IVF4096,PQ64")
    order = [
        "HNSW32,SQfp16",
        "HNSW16,SQfp16",
        "HNSW8,SQfp16",
        f"IVF{nlist_for(10**6)},SQfp16",
        f"IVF{nlist_for(10**6)},SQ8",
    ]
    for factory in order:  # a budget just big enough picks exactly that one
        need = int(10**6 * bytes_per_vector(factory, 512))
        plan = choose(1_000_000, 512, need)
        assert plan.factory == factory and plan.bytes <= need
    tight = choose(1_000_000, 512, 150 * MIB)
    assert tight.factory == "OPQ64,IVF4096,PQ64" and tight.bytes <= 150 * MIB
    assert choose(100, 128, 15_000).factory.endswith("x4")  # too few vectors for 8-bit codes
    with pytest.raises(IndexBuildError, match="need at least 64.8 MiB.*budget allows 50.0 MiB"):
        choose(1_000_000, 512, 50 * MIB)


@pytest.mark.parametrize(
    "factory", ["HNSW16,SQfp16", "HNSW16", "IVF16,SQfp16", "IVF16,Flat", "IVF16,SQ8", "Flat"]
)
def test_memory_estimates_match_what_faiss_writes(factory):
    n, d = 3000, 64
    base = clustered(n, d, seed=5)
    index = VectorIndex.build(base, np.arange(n), factory)
    written = faiss.serialize_index(index.cpu_index).nbytes / n
    # The estimate is in memory: the id map's reverse hash (~48 B a vector) is not written.
    assert written + 48 == pytest.approx(bytes_per_vector(factory, d), rel=0.1)


def test_nlist_is_about_four_root_n_and_trainable():
    assert nlist_for(1_000_000) == 4096
    assert nlist_for(100_000) == 1024
    assert nlist_for(1000) == 25 or nlist_for(1000) <= 1000 // 39
    assert nlist_for(10) == 1


@pytest.mark.parametrize("factory", ["HNSW16,SQfp16", "HNSW16", "IVF64,SQfp16", "IVF64,Flat"])
def test_tuning_reaches_the_target_on_fresh_queries_with_the_smallest_knob(factory):
    base = clustered(20_000, 32, seed=1)
    tuning, fresh = clustered(2000, 32, seed=2, shift=0.3), clustered(300, 32, seed=3, shift=0.3)
    index = VectorIndex.build(base, np.arange(len(base)), factory, train=base)
    got = tune(index, base, tuning, target=0.95)
    assert got.recall_at_10 >= 0.95 and got.queries == autoindex.TUNING_QUERIES
    truth = exact_search(base, np.arange(len(base)), fresh, 10)
    found = index.search(fresh, 10)
    recall = np.mean([len(set(t.ids) & set(f.ids)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.93  # held-out queries generalise


def test_exact_indexes_need_no_tuning():
    base = clustered(500, 16, seed=4)
    assert tune(VectorIndex.build(base, np.arange(500), "Flat"), base, base) is None


def test_build_records_the_tuned_knob_and_searchers_apply_it(tmp_path, synth_corpus, encoder):
    config = BuildConfig(progress=False, workers=0, index="HNSW8", target_recall=0.99)
    build(synth_corpus, "h", config, tmp_path, encoder=encoder)
    manifest = read_manifest(layout.resolve("h", tmp_path))
    for kind in ("image", "caption"):
        search = manifest.indexes[kind].search
        assert search.knob == "efSearch" and search.target == 0.99
        assert search.recall_at_10 >= 0.99
    with Searcher.open("h", tmp_path, encoder=encoder) as s:
        assert s.images.knob() == "efSearch"
        assert s.images.knob_value() == manifest.indexes["image"].search.value


def test_a_memory_budget_compresses_and_results_are_reranked_exactly(
    tmp_path, synth_corpus, encoder
):
    config = BuildConfig(progress=False, workers=0, max_memory=32_000)
    report = build(synth_corpus, "small", config, tmp_path, encoder=encoder)
    manifest = read_manifest(layout.resolve("small", tmp_path))
    image = manifest.indexes["image"]
    assert report.factories["image"] == image.factory != "Flat"
    total = image.memory_bytes + manifest.indexes["caption"].memory_bytes
    assert total <= 32_000
    assert verify("small", tmp_path, sample=4, encoder=encoder).ok
    build(synth_corpus, "exact", BuildConfig(progress=False, workers=0), tmp_path, encoder=encoder)
    query = Query(text="a red circle left of a blue square")
    with (
        Searcher.open("small", tmp_path, encoder=encoder) as small,
        Searcher.open("exact", tmp_path, encoder=encoder) as exact,
    ):
        got = small.search(query, k=5)["results"]
        want = exact.search(query, k=5)["results"]
    # Candidates come from the compressed index, scores from the stored vectors.
    for g in got:
        match = [w for w in want if w["id"] == g["id"]]
        if match:
            assert g["score"] == pytest.approx(match[0]["score"], abs=1e-6)
