"""The query layer end to end on a built index, each strategy against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.corpus.images import load_image
from retrieval.errors import SearchError
from retrieval.index import layout
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.query.search import Query, QueryTerm, Searcher
from retrieval.scoring import fusion

ALL = 100  # overfetch x k covers the whole 40-item corpus: fused results must be exact


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, synth_corpus, encoder):
    root = tmp_path_factory.mktemp("q")
    build(
        synth_corpus, "q", BuildConfig(progress=False, workers=0), index_dir=root, encoder=encoder
    )
    with Searcher.open("q", root, encoder=encoder) as s:
        yield s


def stored(s: Searcher):
    emb = s.folder / layout.EMBEDDINGS
    img = np.load(emb / "image.npy").astype(np.float32)
    cap = np.load(emb / "caption.npy").astype(np.float32)
    return img, cap, np.load(emb / "caption_owner.npy")


def item_max(cap_scores, owner, n):
    out = np.full(n, -np.inf)
    np.maximum.at(out, owner, cap_scores)
    return out


def ids_of(s: Searcher, rows) -> list[str]:
    return s.store.item_ids(rows)


def test_stored_normalisers_match_a_brute_force_recomputation(searcher):
    img, cap, _ = stored(searcher)
    beta, m = searcher.manifest.querybank.beta, searcher.manifest.querybank.m
    sims = np.sort(img @ cap.T, axis=1)[:, ::-1][:, :m]
    want = fusion.logsumexp(beta * sims.astype(np.float64), axis=1)
    got = np.load(searcher.folder / layout.EMBEDDINGS / "image.qbnorm.npy")
    np.testing.assert_allclose(got, want, atol=beta * 2e-3)
    sims = np.sort(cap @ img.T, axis=1)[:, ::-1][:, :m]
    want = fusion.logsumexp(beta * sims.astype(np.float64), axis=1)
    got = np.load(searcher.folder / layout.EMBEDDINGS / "caption.qbnorm.npy")
    np.testing.assert_allclose(got, want, atol=beta * 2e-3)


def test_qbnorm_text_to_image_equals_brute_force(searcher, encoder):
    img, _, _ = stored(searcher)
    text = "a red circle left of a blue square"
    q = encoder.encode_texts([text])[0]
    norm = searcher.space.image_norm
    want = fusion.top_k(searcher.space.beta * (img @ q) - norm, 5)
    out = searcher.search(Query(text=text), k=5, strategy="qbnorm", overfetch=ALL)
    assert [r["id"] for r in out["results"]] == ids_of(searcher, want)
    assert out["strategy"] == "qbnorm" and set(out["results"][0]["scores"]) == {"t2i"}


def test_hybrid_fuses_images_and_captions_like_brute_force(searcher, encoder):
    img, cap, owner = stored(searcher)
    text = "a green triangle above a yellow square"
    q = encoder.encode_texts([text])[0]
    t2i, t2t = img @ q, item_max(cap @ q, owner, len(img))
    want = fusion.top_k(fusion.weighted_sum({"a": t2i, "b": t2t}, {"a": 0.7, "b": 0.3}), 6)
    out = searcher.search(Query(text=text), k=6, strategy="hybrid", mix=0.3, overfetch=ALL)
    assert [r["id"] for r in out["results"]] == ids_of(searcher, want)
    assert set(out["results"][0]["scores"]) == {"t2i", "t2t"}
    rrf = searcher.search(Query(text=text), k=6, strategy="hybrid-rrf", mix=0.5, overfetch=ALL)
    want = fusion.top_k(fusion.reciprocal_rank_fusion({"a": t2i, "b": t2t}, {}), 6)
    assert [r["id"] for r in rrf["results"]] == ids_of(searcher, want)


def test_image_query_hybrid_uses_captions_and_images(searcher, synth_corpus, encoder):
    out = searcher.search(
        Query(image=synth_corpus.parent / "images" / "000003.png"), k=3, strategy="hybrid"
    )
    assert out["target"] == "captions" and set(out["results"][0]["scores"]) == {"i2t", "i2i"}
    assert "caption" in out["results"][0]


def test_composed_query_with_a_negative_term(searcher, encoder, synth_corpus):
    img, _, _ = stored(searcher)
    path = synth_corpus.parent / "images" / "000007.png"
    t = encoder.encode_texts(["a purple square"])[0]
    i = encoder.encode_pil([load_image(path)])[0]
    n = encoder.encode_texts(["a circle"])[0]
    query = Query(
        text="a purple square",
        image=path,
        image_weight=0.3,
        terms=(QueryTerm(text="a circle", weight=-0.5),),
    )
    out = searcher.search(query, k=5, overfetch=ALL)
    score = 0.7 * (img @ t) + 0.3 * (img @ i) - 0.5 * (img @ n)
    assert [r["id"] for r in out["results"]] == ids_of(searcher, fusion.top_k(score, 5))
    assert out["target"] == "images" and len(out["query"]["terms"]) == 3
    assert set(out["results"][0]["scores"]) == {"t2i[0]", "i2i[1]", "t2i[2]"}
    arith = searcher.search(query, k=5, strategy="arith", overfetch=ALL)
    v = 0.7 * t + 0.3 * i - 0.5 * n
    want = fusion.top_k(img @ (v / np.linalg.norm(v)), 5)
    assert [r["id"] for r in arith["results"]] == ids_of(searcher, want)


def test_where_filters_results_exactly(searcher, encoder):
    img, _, _ = stored(searcher)
    text = "a red circle left of a blue square"
    out = searcher.search(Query(text=text), k=4, where=("relation=above",))
    allowed = [
        it["row"] for it in searcher.store.iter_items() if it["extra"]["relation"] == "above"
    ]
    scores = img[allowed] @ encoder.encode_texts([text])[0]
    want = [allowed[j] for j in fusion.top_k(scores, 4)]
    assert [r["id"] for r in out["results"]] == ids_of(searcher, want)
    assert all(r["extra"]["relation"] == "above" for r in out["results"])
    caps = searcher.search(
        Query(text=text), k=50, target="captions", where=("colours=red", "relation!=below")
    )
    assert caps["results"] and all(
        "red" in r["extra"]["colours"] and r["extra"]["relation"] != "below"
        for r in caps["results"]
    )
    none = searcher.search(Query(text=text), where=("relation=nowhere",))
    assert none["results"] == []
    # A field no item has is most likely a typo: an error naming the fields, not "no results".
    for _ in range(2):  # the second answer comes from the cache
        with pytest.raises(SearchError, match=r"no item has the field 'size' \(fields: .*rel"):
            searcher.search(Query(text=text), where=("relation=above", "size=2..5"))


def test_strategy_and_term_errors(searcher):
    with pytest.raises(SearchError, match="unknown strategy"):
        searcher.search(Query(text="x"), strategy="magic")
    with pytest.raises(SearchError, match="cancel out"):
        searcher.search(
            Query(text="x", terms=(QueryTerm(text="x", weight=-1.0),)), strategy="arith"
        )


def test_default_strategy_is_cosine_in_every_direction(searcher, synth_corpus):
    assert searcher.search(Query(text="a red circle"), k=2)["strategy"] == "cosine"
    image = synth_corpus.parent / "images" / "000001.png"
    assert searcher.search(Query(image=image), k=2)["strategy"] == "cosine"
    assert (
        searcher.search(Query(text="a red circle"), k=2, target="captions")["strategy"] == "cosine"
    )
