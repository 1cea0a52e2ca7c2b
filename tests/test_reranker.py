"""The cross-attention re-ranker: ITM loss and negatives, training, saving, search and bench."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_jsonl
from ddp_worker import ITM, ITM_DRAW, global_batch, itm_model
from fastapi.testclient import TestClient
from PIL import Image
from test_train import assert_same_grads

from retrieval.cli import main
from retrieval.errors import EncoderError, SearchError, TrainError
from retrieval.eval.bench import run_bench
from retrieval.eval.config import BenchConfig
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.index.lifecycle import add, compact, remove
from retrieval.model import reranker as rr
from retrieval.model.checkpoints import export_checkpoint
from retrieval.model.distributed import World
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec, RerankerConfig
from retrieval.query.search import Query, Searcher
from retrieval.scoring import metrics
from retrieval.serve.app import create_app
from retrieval.train.config import TrainConfig
from retrieval.train.itm import itm_step
from retrieval.train.loop import train
from retrieval.train.loss import itm_loss, itm_negatives, positive_mask

HERE = Path(__file__).parent
SMALL = RerankerConfig(width=32, layers=1, heads=2)


# --- pure parts: negatives, loss, ranks ---------------------------------------------------


def test_negatives_follow_softmax_over_non_positives_by_hand():
    # Image i (rows) against text j (columns). Texts 0 and 1 carry the same caption, so for
    # images 0 and 1 both are positives; image 2's only positive is text 2.
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0], [4.0, 5.0, 2.0, 0.0], [0.0, 3.0, 9.0, 1.0]])
    logits = torch.cat([logits, torch.tensor([[1.0, 1.0, 1.0, 1.0]])])  # image 3: all positive
    ids = torch.tensor([0, 0, 2, 3])
    positives = positive_mask(ids, ids)
    positives[3] = True  # a row with no candidate at all
    positives[:, 3] = True
    g = torch.Generator().manual_seed(0)
    draws = [itm_negatives(logits, positives, g) for _ in range(4000)]
    text_for_image = torch.stack([d[0] for d in draws])
    image_for_text = torch.stack([d[1] for d in draws])
    # Image 0 may only get text 2 (texts 0, 1 are positives, 3 masked): always.
    assert (text_for_image[:, 0] == 2).all() and (text_for_image[:, 1] == 2).all()
    # Image 2 chooses between texts 0 and 1 by softmax of (0, 3): p(1) = e^3 / (1 + e^3).
    p1 = math.exp(3) / (1 + math.exp(3))
    assert (text_for_image[:, 2] == 1).float().mean().item() == pytest.approx(p1, abs=0.02)
    assert set(text_for_image[:, 2].tolist()) == {0, 1}
    assert (text_for_image[:, 3] == -1).all() and (image_for_text[:, 3] == -1).all()
    # Text 0 (column 0) may get image 2 only; text 2 between images 0 and 1 by (1, 2).
    assert (image_for_text[:, 0] == 2).all()
    p_img1 = math.exp(2) / (math.exp(1) + math.exp(2))
    assert (image_for_text[:, 2] == 1).float().mean().item() == pytest.approx(p_img1, abs=0.02)
    # Never a positive, in any draw.
    for i in range(4):
        drawn = text_for_image[:, i]
        assert not positives[i, drawn[drawn >= 0]].any()


def test_itm_loss_by_hand():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0, 3.0])
    want = (
        math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(-1)) + math.log(2)
    ) + math.log1p(math.exp(3))
    assert itm_loss(pos, neg, 5).item() == pytest.approx(want / 5, rel=1e-6)
    assert itm_loss(pos, neg, 10).item() == pytest.approx(want / 10, rel=1e-6)


@pytest.mark.parametrize("q, c, n", [(7, 13, 5), (1, 3, 3), (9, 4, 10), (5, 31, 1)])
def test_reranked_ranks_match_brute_force(q, c, n):
    rng = np.random.default_rng(q * c)
    scores = rng.integers(0, 4, (q, c)).astype(np.float64)  # many ties
    correct = rng.random((q, c)) < 0.2
    correct[np.arange(q), rng.integers(0, c, q)] = True
    cand = metrics.top_candidates(scores, correct, n)
    logits = rng.integers(0, 3, cand.shape).astype(np.float64)  # ties here too
    got = metrics.reranked_ranks(scores, correct, cand, logits)
    base = metrics.first_hit_ranks(scores, correct)
    for i in range(q):
        # Brute force: sort by score, incorrect first on ties, then by column.
        order = sorted(range(c), key=lambda j: (-scores[i, j], bool(correct[i, j]), j))
        assert list(cand[i]) == order[: min(n, c)]
        mine = [j for j in cand[i] if correct[i, j]]
        if mine:
            best = max(logits[i, list(cand[i]).index(j)] for j in mine)
            beaten = [
                j for k, j in enumerate(cand[i]) if not correct[i, j] and logits[i, k] >= best
            ]
            assert got[i] == len(beaten) + 1
        else:
            assert got[i] == max(base[i], len(cand[i]) + 1)
    # A second stage that keeps the first order changes no rank.
    keep = -np.arange(cand.shape[1], dtype=np.float64)[None, :].repeat(q, 0)
    np.testing.assert_array_equal(metrics.reranked_ranks(scores, correct, cand, keep), base)


# --- the model: saving, loading, pairing ---------------------------------------------------


@pytest.fixture(scope="session")
def itm_run(tmp_path_factory, synth_corpus) -> Path:
    """A tiny-vit trained for a few steps with --itm: its best checkpoint holds a re-ranker."""
    out = tmp_path_factory.mktemp("itm") / "run"
    config = TrainConfig(
        model=ModelSpec("tiny-vit", random_init=True),
        epochs=2,
        batch_size=8,
        warmup=2,
        itm=True,
        reranker=SMALL,
        progress=False,
        workers=0,
    )
    train(synth_corpus, out, config)
    return out / "checkpoints" / "latest.pt"


def test_saved_reranker_reloads_and_scores_identically(itm_run, tmp_path):
    ckpt = torch.load(itm_run, weights_only=True)
    assert set(ckpt) >= {"state_dict", "reranker"}
    assert not any(k.startswith("reranker") for k in ckpt["state_dict"])  # open_clip-loadable
    enc = Encoder.load(ModelSpec("tiny-vit", str(itm_run)), "cpu")
    a, b = rr.load(itm_run, enc.model), rr.load(itm_run, enc.model)
    states, mask = enc.text_states(["a red circle left of a blue square", "a green square"])
    patches = torch.randn(2, a.shapes.image_tokens, a.shapes.image_width)
    with torch.no_grad():
        torch.testing.assert_close(a(states, mask, patches), b(states, mask, patches))
    # An fp16 export keeps the pair together and scores within fp16 rounding.
    half = export_checkpoint(itm_run, tmp_path / "half.pt")
    enc16 = Encoder.load(ModelSpec("tiny-vit", str(half)), "cpu")
    c = rr.load(half, enc16.model)
    with torch.no_grad():
        torch.testing.assert_close(
            c(states, mask, patches), a(states, mask, patches), atol=0.05, rtol=0.05
        )


def test_a_reranker_with_another_dual_encoder_is_refused(itm_run):
    other = Encoder.load(ModelSpec("tiny-vit", random_init=True), "cpu")
    with pytest.raises(EncoderError, match="trained with another dual encoder") as e:
        rr.load(itm_run, other.model)
    assert "\n" not in str(e.value)


def test_frozen_towers_train_only_the_reranker(synth_corpus, tmp_path, itm_run):
    base = Encoder.load(ModelSpec("tiny-vit", str(itm_run)), "cpu")
    config = TrainConfig(
        model=ModelSpec("tiny-vit", str(itm_run)),
        steps=3,
        batch_size=8,
        warmup=1,
        itm=True,
        lock_image=0,
        lock_text=0,
        progress=False,
        workers=0,
    )
    train(synth_corpus, tmp_path / "frozen", config)
    latest = tmp_path / "frozen" / "checkpoints" / "latest.pt"
    after = Encoder.load(ModelSpec("tiny-vit", str(latest)), "cpu")
    imgs = [p for p in sorted((synth_corpus.parent / "images").iterdir())[:4]]
    emb, _, _ = base.encode_image_files(imgs, workers=0)
    emb2, _, _ = after.encode_image_files(imgs, workers=0)
    np.testing.assert_array_equal(emb, emb2)  # the dual encoder did not move
    old, new = torch.load(itm_run, weights_only=True), torch.load(latest, weights_only=True)
    moved = [
        k
        for k, v in new["reranker"]["state_dict"].items()
        if not torch.equal(v, old["reranker"]["state_dict"][k])
    ]
    assert moved  # the re-ranker did
    # The re-ranker trained on frozen towers pairs with the original dual encoder too.
    assert rr.load(latest, base.model) is not None


def test_itm_refuses_gradient_caching(synth_corpus, tmp_path):
    config = TrainConfig(
        model=ModelSpec("tiny-vit", random_init=True), itm=True, chunk_size=4, progress=False
    )
    with pytest.raises(TrainError, match="--itm trains on whole batches"):
        train(synth_corpus, tmp_path / "r", config)


def test_two_processes_match_one_process_with_itm(micro_config, tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(29900 + os.getpid() % 90),
        str(HERE / "ddp_worker.py"), str(micro_config), str(out), str(ITM),
    ]  # fmt: skip
    paths = os.pathsep.join([str(HERE), str(HERE.parent)])
    env = {**os.environ, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    got = torch.load(out, weights_only=True)
    model = itm_model(str(micro_config), World())
    images, tokens, ids = global_batch(
        Encoder.load(ModelSpec(str(micro_config), random_init=True), device="cpu"), 12
    )
    amp = (contextlib.nullcontext, lambda x: x)
    loss = itm_step(model, (images, tokens, ids), World(), amp, 1.0, ITM_DRAW)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got["loss"] == pytest.approx(loss, abs=1e-5)
    assert any(n.startswith("reranker.") for n in grads)
    assert_same_grads(got["grads"], grads, atol=1e-5)


# --- search, lifecycle, serve, bench ------------------------------------------------------


@pytest.fixture(scope="module")
def reranked_index(tmp_path_factory, synth_corpus, itm_run):
    """Two indexes of the synthetic corpus with the --itm model: with and without patches."""
    root = tmp_path_factory.mktemp("rr-idx")
    spec = ModelSpec("tiny-vit", str(itm_run))
    base = BuildConfig(model=spec, progress=False, workers=0)
    build(synth_corpus, "stored", replace(base, patch_tokens=True), index_dir=root)
    build(synth_corpus, "decoded", base, index_dir=root)
    return root


@pytest.mark.parametrize("strategy", ["cosine", "hybrid", "qbnorm"])
def test_rerank_only_reorders_the_candidates(reranked_index, strategy):
    with Searcher.open("stored", reranked_index) as s:
        q = Query(text="a red circle left of a blue square")
        plain = s.search(q, k=12, strategy=strategy)["results"]
        ranked = s.search(q, k=12, strategy=strategy, rerank=12)["results"]
        assert {r["id"] for r in ranked} == {r["id"] for r in plain}
        assert all("itm" in r["scores"] for r in ranked)
        itm = [r["scores"]["itm"] for r in ranked]
        assert itm == sorted(itm, reverse=True)
        # The top 3 of a re-ranked 12 come from those 12; k < N.
        top3 = s.search(q, k=3, strategy=strategy, rerank=12)["results"]
        assert [r["id"] for r in top3] == [r["id"] for r in ranked[:3]]
        # N < k: the first N re-ordered, the rest as the first stage left them.
        part = s.search(q, k=12, strategy=strategy, rerank=4)["results"]
        assert [r["id"] for r in part[4:]] == [r["id"] for r in plain[4:]]


def test_stored_and_decoded_patches_give_the_same_order(reranked_index, synth_corpus):
    image = synth_corpus.parent / "images" / "000007.png"
    with (
        Searcher.open("stored", reranked_index) as a,
        Searcher.open("decoded", reranked_index) as b,
    ):
        assert a.reranking().patches is not None and b.reranking().patches is None
        for q, target in ((Query(text="a green square above a red circle"), None),
                          (Query(image=image), "captions")):  # fmt: skip
            ra = a.search(q, k=8, target=target, rerank=8)["results"]
            rb = b.search(q, k=8, target=target, rerank=8)["results"]
            assert [r["id"] for r in ra] == [r["id"] for r in rb]
            np.testing.assert_allclose(
                [r["score"] for r in ra], [r["score"] for r in rb], atol=2e-3
            )


def test_queries_the_reranker_cannot_judge_are_refused(reranked_index, synth_corpus):
    image = synth_corpus.parent / "images" / "000001.png"
    with Searcher.open("stored", reranked_index) as s:
        for q, target in (
            (Query(text="a red circle"), "captions"),
            (Query(image=image), "images"),
            (Query(text="a red circle", image=image), None),
        ):
            with pytest.raises(SearchError, match="--rerank scores a text against an image"):
                s.search(q, target=target, rerank=5)


def test_an_index_model_without_a_reranker_says_how_to_get_one(tmp_path, synth_corpus):
    spec = ModelSpec("tiny-vit", random_init=True)
    build(synth_corpus, "plain", BuildConfig(model=spec, progress=False), index_dir=tmp_path)
    r = CliRunner().invoke(
        main, ["search", "plain", "--index-dir", str(tmp_path), "--text", "x", "--rerank", "5"]
    )
    assert r.exit_code == 1
    assert "train one with `retrieval train ... --itm`" in r.output
    assert "Traceback" not in r.output


def test_patch_tokens_follow_add_remove_and_compact(tmp_path, synth_corpus, itm_run):
    spec = ModelSpec("tiny-vit", str(itm_run))
    config = BuildConfig(model=spec, progress=False, workers=0, patch_tokens=True)
    rows = [json.loads(line) for line in synth_corpus.read_text().splitlines()]
    for r in rows:
        r["image"] = str(synth_corpus.parent / r["image"])
    first = write_jsonl(tmp_path / "first.jsonl", rows[:25])
    build(first, "live", config, index_dir=tmp_path)
    add(synth_corpus, "live", tmp_path, config)
    add(first, "live", tmp_path, config, upsert=True)  # 25 items re-encoded: new rows
    remove("live", ["synth-3-000004", "synth-3-000030"], index_dir=tmp_path)
    compact("live", index_dir=tmp_path)
    with Searcher.open("live", tmp_path) as s:
        stored = s.reranking().patches
        rows = [it["row"] for it in s.store.iter_items()]
        assert len(stored) == len(rows) == 38
        paths = [Path(it["path"]) for it in s.store.iter_items()]
        fresh = s.encoder.image_patches([Image.open(p).convert("RGB") for p in paths])
        np.testing.assert_allclose(
            np.asarray(stored[rows], np.float32), fresh.numpy(), atol=2e-2, rtol=1e-2
        )


def test_http_rerank_and_stats(reranked_index):
    with Searcher.open("stored", reranked_index) as s, TestClient(create_app(s)) as c:
        assert c.get("/stats").json()["rerank"] is True
        got = c.post("/search", json={"text": "a red circle", "k": 4, "rerank": 10})
        assert got.status_code == 200
        assert all("itm" in r["scores"] for r in got.json()["results"])
        bad = c.post("/search", json={"text": "a red circle", "rerank": 0})
        assert bad.status_code == 422
        wrong = c.post("/search", json={"text": "x", "target": "captions", "rerank": 3})
        assert wrong.status_code == 400 and "--rerank" in wrong.json()["error"]


def test_bench_rerank_rows(synth_corpus, itm_run):
    spec = ModelSpec("tiny-vit", str(itm_run))
    config = BenchConfig(model=spec, rerank=1, group_key="scene", progress=False, workers=0)
    result = run_bench(synth_corpus, config)
    names = [r.strategy for r in result.rows]
    assert names[:2] == ["exact", "exact + rerank@1"]
    assert "hybrid-rrf + rerank@1" in names
    assert "exact, any image of the same scene + rerank@1" in names
    # Re-ranking a top 1 changes nothing: every +rerank@1 row equals the row before it.
    for before, after in zip(result.rows, result.rows[1:], strict=False):
        if after.strategy == f"{before.strategy} + rerank@1":
            assert after.metrics == {k: before.metrics[k] for k in after.metrics}
            assert len(after.metrics) >= 3
    wider = run_bench(synth_corpus, replace(config, rerank=10))
    recalls = {k for k in result.row("exact").metrics if "recall@" in k}
    assert wider.row("exact + rerank@10").metrics.keys() == recalls


def test_reranked_scores_are_the_rerankers_own(reranked_index, synth_corpus):
    """Each result's itm is the re-ranker's probability for (query text, that item's image),
    and for (that item's caption, query image): computed here directly."""
    image = synth_corpus.parent / "images" / "000005.png"
    with Searcher.open("stored", reranked_index) as s:
        enc, model = s.encoder, s.reranking().reranker
        text = "a blue square below a red circle"
        out = s.search(Query(text=text), k=6, rerank=6)["results"]
        states, mask = enc.text_states([text])
        for r in out:
            item = s.store.item(r["id"])
            patches = enc.image_patches([Image.open(item["path"]).convert("RGB")])
            with torch.no_grad():
                want = torch.sigmoid(model(states, mask, patches)).item()
            assert r["scores"]["itm"] == pytest.approx(want, abs=2e-3)
        out = s.search(Query(image=image), k=6, rerank=6)["results"]
        patches = enc.image_patches([Image.open(image).convert("RGB")])
        for r in out:
            states, mask = enc.text_states([r["caption"]["text"]])
            with torch.no_grad():
                want = torch.sigmoid(model(states, mask, patches)).item()
            assert r["scores"]["itm"] == pytest.approx(want, abs=2e-3)


def test_rerank_with_dedup_and_with_nothing_to_rank(reranked_index):
    with Searcher.open("decoded", reranked_index) as s:
        q = Query(text="a red circle left of a blue square")
        plain = s.search(q, k=10, dedup=0.999)["results"]
        ranked = s.search(q, k=10, dedup=0.999, rerank=10)["results"]
        assert {r["id"] for r in ranked} == {r["id"] for r in plain}
        assert all("duplicates" in r for r in ranked)
        none = s.search(q, k=5, rerank=5, where=("relation=nowhere",))
        assert none["results"] == []


def test_bench_ranks_follow_the_reranker_logits(synth_corpus, itm_run):
    """`retrieval.eval.rerank` against a brute force over the same logits, both directions."""
    from retrieval.eval import rerank as eval_rerank

    spec = ModelSpec("tiny-vit", str(itm_run))
    enc = Encoder.load(spec, "cpu")
    rows = [json.loads(line) for line in synth_corpus.read_text().splitlines()]
    paths = [synth_corpus.parent / r["image"] for r in rows]
    texts = [c for r in rows for c in r["captions"]]
    owner = np.array([i for i, r in enumerate(rows) for _ in r["captions"]])
    config = BenchConfig(workers=0)
    inputs = eval_rerank.Inputs.of(rr.load(itm_run, enc.model), enc, paths, texts, config)
    image, text = enc.encode_image_files(paths, workers=0)[0], enc.encode_texts(texts)
    n, items = 7, np.arange(len(paths))
    t2i = eval_rerank.text_to_image(
        inputs, n, lambda r: text[r] @ image.T, lambda r: owner[r, None] == items[None, :]
    )
    i2t = eval_rerank.image_to_text(inputs, n, image, text, owner)
    for q in range(0, len(texts), 11):
        first = text[q] @ image.T
        cand = np.array(sorted(items, key=lambda j: (-first[j], owner[q] == j, j))[:n])
        right = cand == owner[q]
        assert t2i[q] == _pessimistic(inputs.logits(np.full(n, q), cand), right, n, t2i[q])
    for i in range(0, len(paths), 7):
        first = image[i] @ text.T
        cand = np.array(sorted(range(len(texts)), key=lambda j: (-first[j], owner[j] == i, j))[:n])
        right = owner[cand] == i
        assert i2t[i] == _pessimistic(inputs.logits(cand, np.full(n, i)), right, n, i2t[i])


def _pessimistic(logits, right, n, outside=None):
    """1 + the wrong candidates scoring at least the best right one; ``outside`` (the rank
    reported) must be past n when no candidate is right."""
    if not right.any():
        assert outside is None or outside > n
        return outside if outside is not None else n + 1
    return 1 + int(((logits >= logits[right].max() - 1e-6) & ~right).sum())


def test_rerank_on_milvus_decodes_and_matches_faiss(tmp_path, synth_corpus, itm_run):
    spec = ModelSpec("tiny-vit", str(itm_run))
    config = BuildConfig(model=spec, progress=False, workers=0)
    build(synth_corpus, "f", config, index_dir=tmp_path)
    build(synth_corpus, "m", replace(config, backend="milvus"), index_dir=tmp_path)
    with pytest.raises(Exception, match="--patch-tokens is not available with --backend milvus"):
        build(synth_corpus, "m2", replace(config, backend="milvus", patch_tokens=True), tmp_path)
    q = Query(text="a yellow triangle above a green square")
    with Searcher.open("f", tmp_path) as f, Searcher.open("m", tmp_path) as m:
        a, b = f.search(q, k=8, rerank=8)["results"], m.search(q, k=8, rerank=8)["results"]
    assert [r["id"] for r in a] == [r["id"] for r in b]
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-4)
