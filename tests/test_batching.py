"""Searches answered together: `Searcher.search_many` gives each request what `search` gives it
alone, the embedding cache, the server's batcher, and the text towers run without padding."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from fastapi.testclient import TestClient

from retrieval.errors import SearchError
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.model.encoder import Encoder
from retrieval.model.spec import SHIPPED_MODEL, ModelSpec
from retrieval.model.tokens import text_tokens, trimmed
from retrieval.query import ranking
from retrieval.query.cache import EmbeddingCache
from retrieval.query.ranking import STRATEGIES
from retrieval.query.search import Query, QueryTerm, Request, Searcher
from retrieval.serve.app import create_app
from retrieval.serve.batching import Batcher
from retrieval.serve.config import ServeConfig

TEXTS = ["a red circle left of a blue square", "a green triangle", "blue", "a purple square"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, synth_corpus) -> Searcher:
    """The synthetic corpus under the shipped demo model, which carries a re-ranker."""
    root = tmp_path_factory.mktemp("batch")
    encoder = Encoder.load(ModelSpec("tiny-vit", str(SHIPPED_MODEL)), device="cpu")
    config = BuildConfig(progress=False, workers=0, patch_tokens=True)
    build(synth_corpus, "b", config, index_dir=root, encoder=encoder)
    with Searcher.open("b", root, encoder=encoder, cache_size=0) as s:
        yield s


def _image(corpus: Path, n: int) -> Path:
    return sorted((corpus.parent / "images").glob("*.png"))[n]


def _mixed(corpus: Path) -> list[Request]:
    """Texts, images, composed queries, vectors, filters, every strategy, several k."""
    vector = np.random.default_rng(0).standard_normal(128).tolist()
    composed = Query(text=TEXTS[1], image=_image(corpus, 3), image_weight=0.3)
    negative = Query(text=TEXTS[0], terms=(QueryTerm(text="blue", weight=-0.5),))
    out = [Request(Query(text=t), k=k) for t, k in zip(TEXTS, (1, 3, 7, 40), strict=True)]
    out += [Request(Query(image=_image(corpus, n)), k=5) for n in (0, 1)]
    out += [Request(Query(image=_image(corpus, 2)), k=4, target="images")]
    out += [Request(Query(vector=vector), k=6), Request(composed, k=5)]
    out += [Request(Query(text=TEXTS[0]), k=5, strategy=s) for s in STRATEGIES]
    out += [Request(negative, k=5, strategy=s) for s in ("arith", "hybrid")]
    out += [Request(composed, k=8, strategy="arith"), Request(composed, k=3, target="captions")]
    out += [Request(Query(text=TEXTS[3]), k=5, target="captions", strategy="hybrid-rrf")]
    out += [Request(Query(text=TEXTS[0]), k=4, where=("relation=above",))]
    out += [Request(Query(text=TEXTS[2]), k=9, where=("relation=above",), overfetch=3)]
    out += [Request(Query(text=TEXTS[1]), k=5, dedup=0.9), Request(Query(text=TEXTS[0]), rerank=8)]
    out += [Request(Query(image=_image(corpus, 5)), k=3, rerank=6)]
    return out


def _same(got: dict, want: dict) -> None:
    """The same answer, the scores to float32 rounding (a batch's matrix products round the
    last bits differently from one query's)."""
    assert {k: v for k, v in got.items() if k != "results"} == {
        k: v for k, v in want.items() if k != "results"
    }
    assert [r["id"] for r in got["results"]] == [r["id"] for r in want["results"]]
    for g, w in zip(got["results"], want["results"], strict=True):
        assert g.get("caption") == w.get("caption") and g.get("duplicates") == w.get("duplicates")
        assert g["score"] == pytest.approx(w["score"], abs=2e-5)
        assert g["scores"].keys() == w["scores"].keys()
        for key in g["scores"]:
            assert g["scores"][key] == pytest.approx(w["scores"][key], abs=2e-5)


def test_a_mixed_batch_answers_each_request_as_alone(demo, synth_corpus):
    requests = _mixed(synth_corpus)
    alone = [demo.search_many([r])[0] for r in requests]
    together = demo.search_many(requests)
    for got, want in zip(together, alone, strict=True):
        _same(got, want)
    assert [len(a["results"]) for a in alone][:4] == [1, 3, 7, 40]
    shuffled = np.random.default_rng(1).permutation(len(requests))  # no order dependence
    again = demo.search_many([requests[i] for i in shuffled])
    for got, i in zip(again, shuffled, strict=True):
        _same(got, alone[i])


def test_a_bad_request_fails_alone(demo):
    requests = [
        Request(Query(text="a red circle"), k=3),
        Request(Query(text="   ")),
        Request(Query(text="blue"), strategy="nope"),
        Request(Query(text="blue"), where=("nosuchfield=1",)),
        Request(Query(vector=[1.0, 2.0])),
        Request(Query(image="/no/such/image.png")),
        Request(Query(text="a blue square"), k=2, target="captions"),
    ]
    out = demo.search_many(requests, return_exceptions=True)
    assert [isinstance(o, SearchError) for o in out] == [False, *[True] * 5, False]
    assert "empty" in str(out[1]) and "unknown strategy" in str(out[2])
    assert "nosuchfield" in str(out[3]) and "2 numbers" in str(out[4])
    _same(out[0], demo.search(Query(text="a red circle"), k=3))
    _same(out[6], demo.search(Query(text="a blue square"), k=2, target="captions"))
    with pytest.raises(SearchError, match="the text query is empty"):
        demo.search_many(requests)


def test_the_cache_answers_repeats_with_the_same_vectors(demo, synth_corpus, tmp_path):
    cache = EmbeddingCache(3)
    cached = Searcher(demo.folder, demo.encoder, cache=cache)
    image = _image(synth_corpus, 0)
    first = cached.search_many([Request(Query(text=t)) for t in TEXTS[:2]])
    assert (cache.stats().hits, cache.stats().misses, cache.stats().entries) == (0, 2, 2)
    again = cached.search_many([Request(Query(text=TEXTS[0])), Request(Query(image=image))])
    _same(again[0], first[0])
    # The same pixels under another name: found by content.
    copy = tmp_path / "copy.png"
    copy.write_bytes(image.read_bytes())
    assert (cache.stats().hits, cache.stats().entries) == (1, 3)
    by_copy = cached.search(Query(image=copy))
    _same({**by_copy, "query": None}, {**again[1], "query": None})
    assert cache.stats().hits == 2
    for t in TEXTS[2:]:  # two new entries push out the two least recently used
        cached.search(Query(text=t))
    assert cache.get(("t", TEXTS[1])) is None and cache.get(("t", TEXTS[0])) is None
    assert cache.stats().entries == 3
    vec = demo.embed(QueryTerm(text=TEXTS[2]))
    np.testing.assert_allclose(cache.get(("t", TEXTS[2])), vec, atol=1e-6)
    off = EmbeddingCache(0)
    off.put(("t", "x"), vec)
    assert off.get(("t", "x")) is None and off.stats().entries == 0


def test_the_batcher_gathers_requests_on_their_way_in(demo):
    batcher = Batcher(lambda: demo, max_batch=4, wait_ms=60_000)
    try:
        lone = batcher.submit(Request(Query(text="blue"), k=2))
        _, answer = lone.result(timeout=30)  # nothing else in flight: no waiting for company
        _same(answer, demo.search(Query(text="blue"), k=2))
        with batcher.arriving() as submit:  # a request's own arrival ends as it is queued
            _, answer = submit(Request(Query(text="blue"), k=2)).result(timeout=30)
        _same(answer, demo.search(Query(text="blue"), k=2))
        with batcher.arriving():  # a request being read: the worker waits for those queued
            futures = [batcher.submit(Request(Query(text=t), k=3)) for t in TEXTS * 2 + TEXTS[:2]]
        answers = [f.result(timeout=60)[1] for f in futures]
        bad = batcher.submit(Request(Query(text=" ")))
        with pytest.raises(SearchError, match="empty"):
            bad.result(timeout=30)
    finally:
        batcher.close()
    for t, got in zip(TEXTS * 2 + TEXTS[:2], answers, strict=True):
        _same(got, demo.search(Query(text=t), k=3))
    stats = batcher.stats()
    assert stats.sizes == {1: 3, 4: 2, 2: 1} and stats.requests == 13 and stats.batches == 6
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(Request(Query(text="blue")))


def test_a_request_whose_client_went_away_is_dropped(demo):
    entered, gate = threading.Event(), threading.Event()

    def searchers() -> Searcher:  # holds the worker in its first batch until the gate opens
        entered.set()
        gate.wait(60)
        return demo

    batcher = Batcher(searchers, max_batch=8, wait_ms=0)
    try:
        first = batcher.submit(Request(Query(text="blue"), k=1))
        assert entered.wait(30)
        gone, kept = (batcher.submit(Request(Query(text=t), k=1)) for t in TEXTS[:2])
        assert gone.cancel()  # still queued: cancellable, as asyncio cancels a dropped request
        gate.set()
        assert first.result(timeout=30)[1]["results"] and kept.result(timeout=30)[1]["results"]
    finally:
        batcher.close()
    assert gone.cancelled() and batcher.stats().requests == 2


def test_one_at_a_time_keeps_the_order_of_arrival(demo):
    batcher = Batcher(lambda: demo, max_batch=1, wait_ms=5)
    order: list[str] = []
    lock = threading.Lock()
    try:
        with batcher.arriving():
            futures = [batcher.submit(Request(Query(text=t), k=1)) for t in TEXTS]
            for f, t in zip(futures, TEXTS, strict=True):
                f.add_done_callback(
                    lambda _, t=t: (lock.acquire(), order.append(t), lock.release())
                )
        for f in futures:
            f.result(timeout=60)
    finally:
        batcher.close()
    assert order == TEXTS and batcher.stats().sizes == {1: 4}


def _append(lock: threading.Lock, order: list[str], text: str) -> None:
    with lock:
        order.append(text)


def test_the_server_batches_concurrent_requests_and_reports_it(demo, synth_corpus):
    config = ServeConfig(max_batch=16, batch_wait_ms=50)
    searcher = Searcher(demo.folder, demo.encoder, cache=EmbeddingCache(100))
    image = _image(synth_corpus, 4).read_bytes()
    jobs = [{"json": {"text": TEXTS[i % 4], "k": 4}} for i in range(40)]
    jobs += [{"files": {"image": ("q.png", image, "image/png")}, "data": {"k": "3"}}] * 8
    with TestClient(create_app(searcher, config)) as client, ThreadPoolExecutor(12) as pool:
        want = {t: client.post("/search", json={"text": t, "k": 4}).json() for t in TEXTS}
        got = list(pool.map(lambda job: client.post("/search", **job), jobs))
        stats = client.get("/stats").json()
    for job, r in zip(jobs, got, strict=True):
        assert r.status_code == 200, r.text
        if "json" in job:
            _same(r.json(), want[job["json"]["text"]])
    assert len({json.dumps(r.json()["results"]) for r in got[40:]}) == 1
    batching, cache = stats["batching"], stats["cache"]
    assert batching["max_batch"] == 16 and batching["requests"] == 52
    assert cache["size"] == 100 and cache["hits"] + cache["misses"] == 52
    assert cache["entries"] == 5 and cache["hits"] >= 52 - 5 - 12  # a batch's repeats both miss


_VISION = {"image_size": 32, "layers": 1, "width": 16, "head_width": 16, "patch_size": 16}
_TEXT = {"context_length": 20, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
_PAD_MASK = {"no_causal_mask": True, "pad_id": 0, "pool_type": "argmax"}
TOWERS = {  # open_clip configs: a tower whose last position is pooled must keep its padding
    "built-in causal": {"embed_dim": 16, "vision_cfg": _VISION, "text_cfg": _TEXT},
    "TextTransformer, padding mask": {
        "embed_dim": 16, "custom_text": True, "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, **_PAD_MASK},
    },
    "TextTransformer, last token": {
        "embed_dim": 16, "custom_text": True, "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, "no_causal_mask": True, "pool_type": "last"},
    },
    "TextTransformer, no mask": {
        "embed_dim": 16, "custom_text": True, "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, **_PAD_MASK},
    },
}  # fmt: skip
KEPT_WHOLE = ("TextTransformer, last token", "TextTransformer, no mask")


@pytest.mark.parametrize("name", TOWERS)
def test_text_towers_without_their_padding_give_the_same_features(name, tmp_path):
    """Short, long, over-long (cut by the tokenizer) and empty texts in one batch."""
    config = tmp_path / "tower.json"
    config.write_text(json.dumps(TOWERS[name]))
    torch.manual_seed(0)
    model = _model(config)
    if name.endswith("padding mask"):  # open_clip's configs cannot ask for it; its class can
        model.text.use_pad_mask = True
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=20)
    texts = ["a", "a red circle left of a blue square", "word " * 40, "", "two words"]
    tokens = tokenizer(texts)
    short = trimmed(model, tokens)
    with torch.inference_mode():
        full = model.encode_text(tokens)
        cut = text_tokens(model, short)[0]
    if name in KEPT_WHOLE:  # the last position pooled, or padding attended: kept whole
        assert short.shape == tokens.shape
    else:
        assert short.shape[1] == tokens.shape[1]  # the over-long text fills the context
        assert trimmed(model, tokens[[0, 1, 3, 4]]).shape[1] == 10  # the longest: 8 words + 2
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)


def _model(config: Path):
    open_clip.add_model_config(config)
    return open_clip.create_model(config.stem).eval()


def test_a_hugging_face_tower_without_its_padding_gives_the_same_features():
    encoder = Encoder.load(ModelSpec("effnet-minilm"), device="cpu")
    texts = ["a", "a dog on a beach at sunset", "", "word " * 300]
    tokens = encoder.tokenizer(texts)
    assert trimmed(encoder.model, tokens[:3]).shape[1] < tokens.shape[1]
    with torch.inference_mode():
        full = torch.nn.functional.normalize(encoder.model.encode_text(tokens), dim=-1)
    np.testing.assert_allclose(encoder.encode_texts(texts), full.numpy(), atol=1e-5)


class _OneFilterFails:
    """The index's own space, whose backend refuses one filter (as Milvus may refuse an
    expression): only the requests with that filter may fail."""

    def __init__(self, space) -> None:
        self.space, self.beta = space, space.beta

    def __getattr__(self, name: str):
        return getattr(self.space, name)

    def nearest_items(self, vecs, fetch, allowed):
        if isinstance(allowed, str):
            raise SearchError("the backend refused this filter")
        return self.space.nearest_items(vecs, fetch, allowed)


def test_a_failing_search_fails_only_its_own_requests(demo):
    terms = [ranking.Term("t", demo.embed(QueryTerm(text=t))) for t in TEXTS[:2]]
    jobs = [ranking.Job([t], ranking.Options(k=3)) for t in terms]
    jobs.insert(1, ranking.Job([terms[0]], ranking.Options(k=3), allowed="refused"))
    out = ranking.run_many(_OneFilterFails(demo.space), jobs)
    assert isinstance(out[1], SearchError) and "refused" in str(out[1])
    for got, job in zip([out[0], out[2]], [jobs[0], jobs[2]], strict=True):
        want = ranking.run(demo.space, job.terms, job.options)
        assert [h.item for h in got] == [h.item for h in want]
    listed = demo.search_many([Request(Query(text="blue"), where=["relation=above"])])[0]
    assert listed["where"] == ["relation=above"]  # a list, as Python callers may give


def test_an_end_token_that_is_also_padding_keeps_the_padding(tmp_path):
    config = tmp_path / "eos.json"
    config.write_text(json.dumps(TOWERS["TextTransformer, padding mask"]))
    model = _model(config)
    model.text.use_pad_mask, model.text.pool_type = True, "eos"
    model.text.eos_id = model.text.pad_id  # the longest text's end would look like padding
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=20)(["a red circle", "blue"])
    assert trimmed(model, tokens).shape == tokens.shape
