"""add / remove / compact / verify / resume / locks, on real FAISS and LMDB indexes."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import torch
from badinputs import EXPECTED, make_catalogue
from conftest import write_jsonl

from retrieval.corpus import synthetic
from retrieval.corpus.readers import read_corpus
from retrieval.corpus.records import unique_records
from retrieval.errors import IndexBusyError
from retrieval.index import layout, lifecycle
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.index.embeddings import load_embeddings
from retrieval.index.manifest import (
    CAPTION_INDEX,
    IMAGE_INDEX,
    INDEX_FILES,
    Counts,
    IndexEntry,
    Manifest,
    QuerybankSettings,
    read_manifest,
)
from retrieval.index.store import Store
from retrieval.index.vector_index import VectorIndex
from retrieval.index.verify import verify
from retrieval.model import spool
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec
from retrieval.query.search import Query, Searcher


def _config(index: str = "Flat") -> BuildConfig:
    return BuildConfig(progress=False, workers=0, index=index, shard_size=8, batch_size=8)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return synthetic.generate(root / "a", n=30, seed=1), synthetic.generate(
        root / "b", n=13, seed=2
    )


def _ids(root, name="x") -> list[str]:
    with Store.open(layout.resolve(name, root) / layout.STORE) as store:
        return [it["id"] for it in store.iter_items()]


def _corpus_ids(corpus) -> list[str]:
    return [r.id for r in unique_records(read_corpus(corpus))[0]]


def _everything(root, encoder, text="a red square", name="x") -> list[str]:
    """Ids of every item a text query can reach, best first (k = all)."""
    with Searcher.open(name, root, encoder=encoder) as s:
        return [r["id"] for r in s.search(Query(text=text), k=1000)["results"]]


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_add_remove_compact_keep_every_index_consistent(tmp_path, corpora, encoder, factory):
    a, b = corpora
    build(a, "x", _config(factory), tmp_path, encoder=encoder)
    report = lifecycle.add(b, "x", tmp_path, _config(), encoder=encoder)
    assert (report.added, report.replaced, report.changed) == (13, 0, True)
    assert sorted(_ids(tmp_path)) == sorted(_corpus_ids(a) + _corpus_ids(b))
    assert verify("x", tmp_path, sample=4, encoder=encoder).ok
    gone = _corpus_ids(a)[::3] + _corpus_ids(b)[:2]
    report = lifecycle.remove("x", [*gone, "no-such-id"], tmp_path)
    assert report.removed == len(gone) and report.missing == ["no-such-id"]
    # Flat deletes from FAISS; HNSW and IVF cannot, so the rows become tombstones.
    assert report.tombstones == (0 if factory == "Flat" else len(gone))
    assert verify("x", tmp_path, sample=4, encoder=encoder).ok
    live = set(_corpus_ids(a) + _corpus_ids(b)) - set(gone)
    assert set(_ids(tmp_path)) == live
    reachable = _everything(tmp_path, encoder)
    assert not set(reachable) & set(gone)
    if factory != "IVF4,Flat":  # an IVF probes only some lists, so not every item is reachable
        assert set(reachable) == live
    before = _everything(tmp_path, encoder, "a blue circle")
    report = lifecycle.compact("x", tmp_path)
    assert report.tombstones == 0 and report.removed == len(gone)
    assert verify("x", tmp_path, sample=4, encoder=encoder).ok
    assert set(_ids(tmp_path)) == live
    if factory == "Flat":  # exact search: the same ranking from the compacted index
        assert _everything(tmp_path, encoder, "a blue circle") == before
    manifest = read_manifest(layout.resolve("x", tmp_path))
    assert [h.op for h in manifest.history] == ["add", "remove", "compact"]
    assert manifest.counts.items == len(live)


def test_add_skips_known_ids_or_replaces_them_with_upsert(tmp_path, corpora, encoder):
    a, _ = corpora
    build(a, "x", _config(), tmp_path, encoder=encoder)
    first = _corpus_ids(a)[0]
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    rows[0]["captions"] = ["a brand new caption"]
    changed = write_jsonl(a.parent / "changed.jsonl", [rows[0], rows[1]])
    report = lifecycle.add(changed, "x", tmp_path, _config(), encoder=encoder)
    assert (report.added, report.replaced) == (0, 0)
    assert report.skipped == {"id already in the index (use --upsert to replace)": 2}
    report = lifecycle.add(changed, "x", tmp_path, _config(), upsert=True, encoder=encoder)
    assert (report.added, report.replaced) == (0, 2)
    assert sorted(_ids(tmp_path)) == sorted(_corpus_ids(a))
    with Searcher.open("x", tmp_path, encoder=encoder) as s:
        assert [c["text"] for c in s.store.item(first)["captions"]] == ["a brand new caption"]
    assert verify("x", tmp_path, sample=30, encoder=encoder).ok


def test_add_skips_every_bad_input_with_its_reason(tmp_path, corpora, encoder):
    a, _ = corpora
    build(a, "x", _config(), tmp_path, encoder=encoder)
    make_catalogue(tmp_path / "files")
    rows = [{"id": n, "image": f"files/{n}", "caption": f"picture {n}"} for n in EXPECTED]
    rows += [
        {"id": "dup", "image": "files/gray.png", "caption": "first"},
        {"id": "dup", "image": "files/cmyk.jpg", "caption": "second"},
    ]
    corpus = write_jsonl(tmp_path / "bad.jsonl", rows)
    corpus.write_text(corpus.read_text() + "{not json\n")
    report = lifecycle.add(corpus, "x", tmp_path, _config(), encoder=encoder)
    good = [n for n, why in EXPECTED.items() if why is None]
    assert report.added == len(good) + 1
    want = {"duplicate id": 1, "malformed record": 1}
    for why in filter(None, EXPECTED.values()):
        want[why] = want.get(why, 0) + 1
    assert dict(report.skipped) == want
    skipped = (layout.resolve("x", tmp_path) / layout.SKIPPED).read_text().splitlines()
    assert {json.loads(line)["id"] for line in skipped} >= {"missing.jpg", "bomb.png", "dup"}
    assert set(_ids(tmp_path)) == set(_corpus_ids(a)) | set(good) | {"dup"}
    assert verify("x", tmp_path, sample=0).ok


def test_a_resumed_build_reencodes_nothing_spooled_and_equals_an_uninterrupted_one(
    tmp_path, corpora, encoder
):
    a, _ = corpora
    build(a, "whole", _config(), tmp_path, encoder=encoder)
    records, _ = unique_records(read_corpus(a))
    # An interrupted build: the first two shards made it to the spool.
    spool.encode(
        records[:16], encoder, layout.spool_dir(tmp_path, "part"), _config().spool_options()
    )
    report = build(a, "part", _config(), tmp_path, encoder=encoder, resume=True)
    assert report.resumed_shards == 2
    assert not layout.spool_dir(tmp_path, "part").exists()
    whole, part = (_vectors(tmp_path, n) for n in ("whole", "part"))
    assert whole.keys() == part.keys()
    for kind in whole:
        assert np.array_equal(whole[kind], part[kind])
    assert _ids(tmp_path, "whole") == _ids(tmp_path, "part")


def _vectors(root, name) -> dict[str, np.ndarray]:
    folder = layout.resolve(name, root)
    out = {}
    for kind, file in (("image", IMAGE_INDEX), ("caption", CAPTION_INDEX)):
        index = VectorIndex.load(folder / file, "Flat")
        out[kind] = index.vectors(np.sort(index.ids()))
    return out


def test_verify_reports_each_kind_of_damage(tmp_path, corpora, encoder):
    a, _ = corpora
    build(a, "x", _config("HNSW16"), tmp_path, encoder=encoder)
    folder = layout.resolve("x", tmp_path)
    (folder / layout.SKIPPED).write_text("{broken\n")
    report = verify("x", tmp_path, sample=0)
    assert not report.ok
    failed = {c.name for c in report.checks if not c.ok}
    assert failed == {"checksums", "skip report"}
    # An item the store lost: counts and ids no longer add up.
    with Store.create(folder / layout.STORE) as store:
        store.remove_items([_corpus_ids(a)[0]])
    failed = {c.name for c in verify("x", tmp_path, sample=0).checks if not c.ok}
    assert {"counts", "image ids", "caption ids"} <= failed
    # Vectors that are not the items' own.
    emb = folder / layout.EMBEDDINGS / "image.npy"
    np.save(emb, np.load(emb)[::-1].copy())
    failed = {c.name for c in verify("x", tmp_path, sample=5, encoder=encoder).checks if not c.ok}
    assert {"embeddings", "re-encoded sample"} <= failed
    (folder / IMAGE_INDEX).write_bytes(b"not faiss")
    report = verify("x", tmp_path, sample=0)
    assert "readable" in {c.name for c in report.checks if not c.ok}
    # A model that gives NaN fails its own check (a NaN cosine used to pass).
    build(a, "y", _config("HNSW16"), tmp_path, encoder=encoder)
    broken = Encoder.load(ModelSpec("tiny-vit", random_init=True), device="cpu")
    with torch.no_grad():
        broken.model.visual.proj.fill_(float("nan"))
    report = verify("y", tmp_path, sample=5, encoder=broken)
    [check] = [c for c in report.checks if not c.ok]
    assert check.name == "re-encoded sample" and "NaN or infinite" in check.detail


def test_a_second_writer_fails_clearly_or_waits(tmp_path, corpora, encoder):
    a, b = corpora
    build(a, "x", _config(), tmp_path, encoder=encoder)
    held, release = threading.Event(), threading.Event()

    def writer():
        with layout.writer_lock(tmp_path, "x"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    held.wait(10)
    with pytest.raises(IndexBusyError, match="being changed by another process"):
        lifecycle.remove("x", [_corpus_ids(a)[0]], tmp_path)
    threading.Timer(0.3, release.set).start()
    report = lifecycle.add(b, "x", tmp_path, _config(), encoder=encoder, wait=10)
    t.join()
    assert report.added == 13


def test_readers_see_the_old_state_or_the_new_one_never_a_mix(tmp_path, corpora, encoder):
    a, b = corpora
    build(a, "x", _config(), tmp_path, encoder=encoder)
    old = _everything(tmp_path, encoder)
    lifecycle.add(b, "x", tmp_path, _config(), encoder=encoder)
    new = _everything(tmp_path, encoder)
    lifecycle.remove("x", _corpus_ids(b), tmp_path)
    assert _everything(tmp_path, encoder) == old
    long_lived = Searcher.open("x", tmp_path, encoder=encoder)
    seen, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(tuple(_everything(tmp_path, encoder)))
            live = long_lived.latest()
            seen.append(
                tuple(r["id"] for r in live.search(Query(text="a red square"), k=1000)["results"])
            )

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in range(3):
        lifecycle.add(b, "x", tmp_path, _config(), encoder=encoder)
        lifecycle.remove("x", _corpus_ids(b), tmp_path)
    lifecycle.add(b, "x", tmp_path, _config(), encoder=encoder)
    stop.set()
    for t in threads:
        t.join()
    assert len(seen) > 4
    assert set(seen) <= {tuple(old), tuple(new)}
    assert (
        long_lived.latest().search(Query(text="a red square"), k=1000)["results"][0]["id"] == new[0]
    )


def test_added_rows_get_the_querybank_normalisers_a_whole_build_gives_them(
    tmp_path, corpora, encoder
):
    a, b = corpora
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    rows = [{**r, "image": str(a.parent / r["image"])} for r in rows]
    rows += [
        {**r, "image": str(b.parent / r["image"])}
        for r in (json.loads(line) for line in b.read_text().splitlines())
    ]
    both = write_jsonl(tmp_path / "both.jsonl", rows)
    build(both, "whole", _config(), tmp_path, encoder=encoder)
    build(a, "x", _config(), tmp_path, encoder=encoder)
    lifecycle.add(b, "x", tmp_path, _config(), encoder=encoder)
    whole = load_embeddings(layout.resolve("whole", tmp_path))
    added = load_embeddings(layout.resolve("x", tmp_path))
    n, c = 30, 90  # corpus a's items and captions come first in both
    np.testing.assert_allclose(added.image_norm[n:], whole.image_norm[n:], atol=2e-3)
    np.testing.assert_allclose(added.caption_norm[c:], whole.caption_norm[c:], atol=2e-3)


def test_a_reader_of_a_published_version_never_blocks_a_writer_after_pruning(tmp_path):
    # py-lmdb refuses to open files whose inodes an open environment registered. A reader
    # (read-only, no locking) must register only files it holds open: otherwise, once its
    # version is pruned, a writer's new file that reuses a freed inode fails to open.
    def fill(folder):
        with Store.create(folder / layout.STORE):
            pass
        entries = {k: IndexEntry(f, "Flat", 0) for k, f in INDEX_FILES.items()}
        return Manifest(
            "x", "now", "0", "tiny-vit", None, None, 4, 8, entries, Counts(0, 0), "none",
            QuerybankSettings(20.0, 10, "corpus"),
        )  # fmt: skip

    store_dir = layout.commit(tmp_path, "x", fill).resolve() / layout.STORE
    assert not (store_dir / "lock.mdb").exists()
    with Store.open(store_dir):
        fresh = tmp_path / "fresh.lmdb"
        fresh.mkdir()
        for f in store_dir.iterdir():  # the reuse, made certain: the same inodes, new paths
            if f.name != "data.mdb":
                os.link(f, fresh / f.name)
        with Store.create(fresh):
            pass
