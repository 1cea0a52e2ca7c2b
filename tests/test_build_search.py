"""The build and query paths through the Python API, on small real corpora."""

from __future__ import annotations

import json

import numpy as np
import pytest
from badinputs import EXPECTED, make_catalogue
from conftest import write_jsonl

from retrieval.errors import IndexBuildError, SearchError
from retrieval.index import layout
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.index.manifest import Manifest, read_manifest
from retrieval.model.spec import ModelSpec
from retrieval.query.search import Query, Searcher

QUIET = BuildConfig(progress=False, workers=0)


@pytest.fixture(scope="module")
def synth_index(tmp_path_factory, synth_corpus, encoder):
    root = tmp_path_factory.mktemp("indexes")
    build(synth_corpus, "synth", QUIET, index_dir=root, encoder=encoder)
    return root


def test_build_writes_a_self_describing_folder(synth_index):
    folder = layout.resolve("synth", synth_index)
    m = read_manifest(folder)
    assert m.model == "tiny-vit" and m.pretrained is None and m.dim == 128
    # The typed manifest writes back exactly the JSON it read: the file format is its own.
    raw = json.loads((folder / "manifest.json").read_text())
    assert Manifest.from_json(raw).to_json() == raw
    assert m.counts.items == 40 and m.counts.captions == 120
    assert m.indexes["image"].factory == "Flat"
    for f in ("image.faiss", "caption.faiss", "meta.lmdb", "skipped.jsonl", "embeddings"):
        assert (folder / f).exists(), f
    assert (synth_index / "synth").is_symlink()


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda m: m["indexes"]["image"].update(file="../../elsewhere.faiss"), "not 'image.faiss'"),
        (lambda m: m.pop("context_length"), "missing field 'context_length'"),
        (lambda m: m.update(format_version=2), "format_version 2"),
    ],
)
def test_a_malformed_manifest_is_one_line_and_a_verify_finding(synth_index, tmp_path, damage, why):
    from retrieval.index.verify import verify

    folder = tmp_path / "v1"
    folder.mkdir()
    raw = json.loads((layout.resolve("synth", synth_index) / "manifest.json").read_text())
    damage(raw)
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(SearchError, match=why) as err:
        read_manifest(folder)
    assert "\n" not in str(err.value) and "manifest.json is unreadable" in str(err.value)
    (tmp_path / "v").symlink_to(folder)  # published under a name, as an index is
    report = verify("v", tmp_path, sample=0)
    assert not report.ok and "FAIL manifest" in report.summary() and why in report.summary()


def test_text_search_matches_brute_force_over_stored_embeddings(synth_index, encoder):
    folder = layout.resolve("synth", synth_index)
    emb = np.load(folder / "embeddings" / "image.npy").astype(np.float32)
    with Searcher.open("synth", synth_index, encoder=encoder) as s:
        out = s.search(Query(text="a red circle left of a blue square"), k=7, strategy="cosine")
        q = encoder.encode_texts(["a red circle left of a blue square"])[0]
        want = np.argsort(-(emb @ q), kind="stable")[:7]
        rows = [s.store.item(r["id"])["row"] for r in out["results"]]
    assert rows == want.tolist()
    assert [r["rank"] for r in out["results"]] == list(range(1, 8))
    first = out["results"][0]
    assert set(first) >= {"rank", "id", "score", "path", "captions", "extra"}
    assert first["extra"]["scene"]


def test_image_query_searches_captions_and_returns_distinct_items(
    synth_index, encoder, synth_corpus
):
    image = synth_corpus.parent / "images" / "000000.png"
    with Searcher.open("synth", synth_index, encoder=encoder) as s:
        out = s.search(Query(image=image), k=10)
        same = s.search(Query(image=image), k=3, target="images")
        t2t = s.search(Query(text="a red circle"), k=4, target="captions")
    assert out["target"] == "captions" and len(out["results"]) == 10
    ids = [r["id"] for r in out["results"]]
    assert len(set(ids)) == 10
    assert all(r["caption"]["text"] in r["captions"] for r in out["results"])
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)
    assert same["results"][0]["id"] == "synth-3-000000"
    assert same["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(t2t["results"]) == 4


def test_k_larger_than_the_corpus_returns_everything(synth_index, encoder):
    with Searcher.open("synth", synth_index, encoder=encoder) as s:
        assert len(s.search(Query(text="x"), k=1000)["results"]) == 40
        assert len(s.search(Query(text="x"), k=1000, target="captions")["results"]) == 40


def test_bad_queries_are_clear_errors(synth_index, encoder, tmp_path):
    with Searcher.open("synth", synth_index, encoder=encoder) as s:
        with pytest.raises(SearchError, match="empty"):
            s.search(Query(text="  "))
        with pytest.raises(SearchError, match="cannot use the query image: missing file"):
            s.search(Query(image=tmp_path / "nope.jpg"))
        with pytest.raises(SearchError, match="k must be at least 1"):
            s.search(Query(text="a"), k=0)
    with pytest.raises(SearchError, match="no index named 'nope'.*synth"):
        Searcher.open("nope", synth_index)


def test_search_refuses_another_model(synth_index):
    with pytest.raises(SearchError, match="built with model tiny-vit.*not small-vit"):
        Searcher.open("synth", synth_index, model=ModelSpec("small-vit", random_init=True))


def test_every_bad_input_is_skipped_with_its_reason_and_nothing_is_lost(tmp_path, encoder):
    files = make_catalogue(tmp_path / "files")
    rows = [
        {"id": name, "image": f"files/{name}", "caption": f"picture {name}"} for name in EXPECTED
    ]
    rows += [
        {"id": "dup", "image": "files/gray.png", "captions": ["first"]},
        {"id": "dup", "image": "files/cmyk.jpg", "captions": ["second"]},
        {"id": "captions", "image": "files/gray.png", "captions": ["", "ok", "word " * 60]},
    ]
    corpus = write_jsonl(tmp_path / "c.jsonl", rows)
    corpus.write_text(corpus.read_text() + "not json\n")
    report = build(corpus, "bad", QUIET, index_dir=tmp_path / "ix", encoder=encoder)
    good = [n for n, why in EXPECTED.items() if why is None]
    assert report.items == len(good) + 2
    want = {"duplicate id": 1, "empty caption": 1, "malformed record": 1}
    for why in EXPECTED.values():
        if why:
            want[why] = want.get(why, 0) + 1
    assert dict(report.skipped) == want
    assert report.truncated == 1
    lines = [json.loads(x) for x in (report.path / "skipped.jsonl").read_text().splitlines()]
    assert {(r["id"], r["reason"]) for r in lines} >= {
        ("missing.jpg", "missing file"),
        ("dup", "duplicate id"),
        ("captions#0", "empty caption"),
        ("bomb.png", "too many pixels"),
    }
    assert len(lines) == sum(want.values()) + 1  # + the truncated caption note
    assert files["rotated.jpg"].exists()


def test_a_corpus_of_only_bad_records_is_one_clear_error(tmp_path, encoder):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"image": "gone.jpg", "caption": "x"}])
    with pytest.raises(IndexBuildError, match="nothing to index.*missing file: 1"):
        build(corpus, "none", QUIET, index_dir=tmp_path, encoder=encoder)
    assert layout.list_indexes(tmp_path) == []


def test_rebuild_swaps_atomically_and_keeps_one_previous_version(tmp_path, synth_corpus, encoder):
    for _ in range(3):
        build(synth_corpus, "x", QUIET, index_dir=tmp_path, encoder=encoder)
    versions = sorted((tmp_path / ".versions" / "x").iterdir())
    assert len(versions) == 2
    assert (tmp_path / "x").readlink().name == layout.resolve("x", tmp_path).name
    assert layout.list_indexes(tmp_path) == ["x"]


def test_index_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(layout.ENV_INDEX_DIR, str(tmp_path))
    assert layout.index_root() == tmp_path
    monkeypatch.delenv(layout.ENV_INDEX_DIR)
    assert str(layout.index_root()) == "indexes"
