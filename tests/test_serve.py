"""The HTTP API through FastAPI's test client: same answers as the library, 4xx for bad input."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import write_image
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec
from retrieval.query.search import Query, Searcher
from retrieval.serve.app import create_app
from retrieval.serve.config import ServeConfig

QUERY = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, synth_corpus, encoder):
    root = tmp_path_factory.mktemp("indexes")
    build(synth_corpus, "web", BuildConfig(progress=False, workers=0), root, encoder=encoder)
    with Searcher.open("web", root, encoder=encoder) as s:
        yield s


@pytest.fixture(scope="module")
def client(searcher):
    # Small limits so that the size checks are cheap to hit.
    config = ServeConfig(max_upload_bytes=200_000, max_pixels=1_000_000, max_k=50)
    with TestClient(create_app(searcher, config)) as c:
        yield c


def png_bytes(size=(48, 40), colour=(30, 90, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def corpus_root(searcher) -> Path:
    corpus = Path(searcher.manifest.corpus)
    return corpus if corpus.is_dir() else corpus.parent


def strip(out: dict, searcher) -> dict:
    """The library's answer from the server's: no image URLs, and the paths whole again."""
    root = corpus_root(searcher)
    return {
        **out,
        "results": [
            {k: v for k, v in r.items() if k != "image_url"}
            | ({"path": str(root / r["path"])} if r.get("path") else {})
            for r in out["results"]
        ],
    }


def test_paths_are_relative_to_the_corpus_unless_the_operator_asks(searcher, client):
    full = searcher.search(Query(text=QUERY), k=3)["results"]
    root = corpus_root(searcher)
    shown = client.post("/search", json={"text": QUERY, "k": 3}).json()["results"]
    assert [r["path"] for r in shown] == [
        Path(r["path"]).relative_to(root).as_posix() for r in full
    ]
    assert client.get(f"/items/{full[0]['id']}").json()["path"] == shown[0]["path"]
    with TestClient(create_app(searcher, ServeConfig(show_paths=True))) as operator:
        paths = [
            r["path"]
            for r in operator.post("/search", json={"text": QUERY, "k": 3}).json()["results"]
        ]
        assert paths == [r["path"] for r in full]
        assert operator.get(f"/items/{full[0]['id']}").json()["path"] == full[0]["path"]


def test_json_text_search_is_the_library_answer(client, searcher):
    r = client.post("/search", json={"text": QUERY, "k": 7})
    assert r.status_code == 200
    out = r.json()
    assert strip(out, searcher) == json.loads(json.dumps(searcher.search(Query(text=QUERY), k=7)))
    assert [x["rank"] for x in out["results"]] == list(range(1, 8))
    first = out["results"][0]
    assert first["image_url"] == f"/items/{first['id']}/image"
    assert out["strategy"] == "cosine" and set(first["scores"]) == {"t2i"}
    hybrid = client.post("/search", json={"text": QUERY, "k": 7, "strategy": "hybrid"}).json()
    assert set(hybrid["results"][0]["scores"]) == {"t2i", "t2t"}


def test_options_pass_through(client, searcher):
    body = {
        "text": QUERY,
        "k": 5,
        "strategy": "cosine",
        "target": "captions",
        "where": ["relation=above"],
    }
    out = client.post("/search", json=body).json()
    want = searcher.search(
        Query(text=QUERY), k=5, strategy="cosine", target="captions", where=("relation=above",)
    )
    assert strip(out, searcher) == json.loads(json.dumps(want))
    assert out["results"] and all(x["extra"]["relation"] == "above" for x in out["results"])


def test_multipart_image_upload_searches_captions(client, searcher, synth_corpus):
    path = synth_corpus.parent / "images" / "000004.png"
    r = client.post(
        "/search", files={"image": ("q.png", path.read_bytes(), "image/png")}, data={"k": "4"}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    want = searcher.search(Query(image=path), k=4)
    assert out["target"] == "captions" and [x["id"] for x in out["results"]] == [
        x["id"] for x in want["results"]
    ]
    assert [x["caption"] for x in out["results"]] == [x["caption"] for x in want["results"]]


def test_composed_json_query_with_base64_image(client, searcher, synth_corpus):
    path = synth_corpus.parent / "images" / "000002.png"
    b64 = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    out = client.post(
        "/search", json={"text": QUERY, "image": b64, "image_weight": 0.3, "k": 6}
    ).json()
    want = searcher.search(Query(text=QUERY, image=path, image_weight=0.3), k=6)
    assert [x["id"] for x in out["results"]] == [x["id"] for x in want["results"]]
    assert [t["weight"] for t in out["query"]["terms"]] == pytest.approx([0.7, 0.3])


def test_multipart_composed_query_with_filters(client, searcher, synth_corpus):
    path = synth_corpus.parent / "images" / "000002.png"
    data = {"text": QUERY, "k": "5", "where": ["relation!=above", "relation!=below"]}
    r = client.post(
        "/search", files={"image": ("q.png", path.read_bytes(), "image/png")}, data=data
    )
    assert r.status_code == 200, r.text
    assert all(x["extra"]["relation"] in ("left of", "right of") for x in r.json()["results"])


def test_search_by_an_indexed_items_image(client, searcher):
    item_id = searcher.store.item_ids([3])[0]
    out = client.post("/search", json={"image_id": item_id, "k": 3}).json()
    want = searcher.search(Query(image=searcher.store.item(item_id)["path"]), k=3)
    assert [x["id"] for x in out["results"]] == [x["id"] for x in want["results"]]
    assert out["query"] == {"image_id": item_id}


def test_a_model_that_cannot_encode_the_query_gives_a_json_500(searcher):
    broken = Encoder.load(ModelSpec("tiny-vit", random_init=True), device="cpu")
    with torch.no_grad():
        broken.model.visual.proj.fill_(float("nan"))  # texts still encode; images do not
    with (
        Searcher.open("web", searcher.link.parent, encoder=broken) as s,
        TestClient(create_app(s)) as c,
    ):
        assert c.post("/search", json={"text": QUERY}).status_code == 200
        r = c.post("/search", files={"image": ("q.png", png_bytes(), "image/png")})
    assert r.status_code == 500
    assert "cannot encode this query: the model gave NaN" in r.json()["error"]


def test_items_and_their_images(client, searcher):
    item_id = searcher.store.item_ids([0])[0]
    meta = client.get(f"/items/{item_id}").json()
    stored = searcher.store.item(item_id)
    assert meta["id"] == item_id and meta["captions"] == stored["captions"]
    full = client.get(f"/items/{item_id}/image")
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    assert full.content == Path(stored["path"]).read_bytes()
    thumb = client.get(f"/items/{item_id}/image", params={"size": 32})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 32


def test_health_stats_and_docs(client, searcher):
    assert client.get("/health").json()["status"] == "ok"
    stats = client.get("/stats").json()
    assert stats["counts"] == {
        "items": 40,
        "captions": 120,
        "image_tombstones": 0,
        "caption_tombstones": 0,
    }
    assert stats["model"] == "tiny-vit" and stats["indexes"] == {"image": "Flat", "caption": "Flat"}
    assert "hybrid" in stats["strategies"]
    assert client.get("/docs").status_code == 200
    assert "/search" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "search-form" in page.text
    assert client.get("/static/app.js").status_code == 200


BAD_JSON = [
    ({"text": "   "}, 400, "empty"),
    ({}, 400, "empty"),
    ({"text": QUERY, "k": 0}, 422, "k"),
    ({"text": QUERY, "k": 51}, 422, "k"),
    ({"text": QUERY, "k": "many"}, 422, "k"),
    ({"text": QUERY, "strategy": "magic"}, 422, "strategy"),
    ({"text": QUERY, "target": "pixels"}, 422, "target"),
    ({"text": QUERY, "colour": "red"}, 422, "colour"),
    ({"text": QUERY, "where": ["relation>=x"]}, 400, "number"),
    ({"image": "not base64!!"}, 400, "base64"),
    ({"image": 12}, 422, "base64"),
    ({"image": base64.b64encode(b"%PDF-1.4 not an image").decode()}, 415, "not an image"),
    ({"image": ""}, 400, "empty"),
    ({"image_id": "no-such-item"}, 404, "no-such-item"),
    ({"image_id": "../../etc/passwd"}, 404, "no item"),
]


@pytest.mark.parametrize(("body", "status", "words"), BAD_JSON)
def test_bad_json_requests_get_a_4xx_with_one_message(client, body, status, words):
    r = client.post("/search", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error and "\n" not in error
    assert client.get("/health").status_code == 200


def test_malformed_bodies(client):
    for content, ctype, status in [
        (b'{"text": "a dog"', "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b"text=a+dog", "application/x-www-form-urlencoded", 415),
        (b"--x\r\nbroken", "multipart/form-data; boundary=x", 400),
    ]:
        r = client.post("/search", content=content, headers={"content-type": ctype})
        assert r.status_code == status, (content, r.text)
        assert r.json()["error"]


def test_upload_limits(client, tmp_path):
    big = client.post("/search", files={"image": ("big.bin", b"\0" * 300_000, "image/png")})
    assert big.status_code == 413 and "limit" in big.json()["error"]
    bomb = png_bytes(size=(1200, 1000))  # 1.2 MP > the 1 MP limit, but a small file
    r = client.post("/search", files={"image": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413 and "too many pixels" in r.json()["error"]
    text = client.post("/search", files={"image": ("a.txt", b"hello", "text/plain")})
    assert text.status_code == 415
    empty = client.post("/search", files={"image": ("e.png", b"", "image/png")})
    assert empty.status_code == 400
    cmyk = write_image(tmp_path / "c.jpg", mode="CMYK", colour=(0, 200, 200, 0))
    ok = client.post("/search", files={"image": ("c.jpg", cmyk.read_bytes(), "image/jpeg")})
    assert ok.status_code == 200


def test_items_refuse_unknown_ids_and_paths(client, searcher):
    for path in ["/items/nope", "/items/nope/image", "/items/..%2F..%2Fetc%2Fpasswd/image"]:
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"], path
    item_id = searcher.store.item_ids([0])[0]
    for size in ("0", "100000", "big"):
        r = client.get(f"/items/{item_id}/image", params={"size": size})
        assert r.status_code == 422 and "size" in r.json()["error"]
    assert client.get("/nowhere").json() == {"error": "Not Found"}


def test_a_running_server_follows_adds_and_removes(tmp_path, synth_corpus, encoder):
    from retrieval.corpus import synthetic
    from retrieval.index import lifecycle

    config = BuildConfig(progress=False, workers=0)
    build(synth_corpus, "live", config, tmp_path, encoder=encoder)
    more = synthetic.generate(tmp_path / "more", n=5, seed=11)
    with (
        Searcher.open("live", tmp_path, encoder=encoder) as s,
        TestClient(create_app(s)) as c,
    ):
        assert c.get("/stats").json()["counts"]["items"] == 40
        lifecycle.add(more, "live", tmp_path, config, encoder=encoder)
        assert c.get("/stats").json()["counts"]["items"] == 45
        new = c.get("/items/synth-11-000002").json()
        assert new["id"] == "synth-11-000002"
        ids = [r["id"] for r in c.post("/search", json={"text": QUERY, "k": 50}).json()["results"]]
        assert "synth-11-000002" in ids
        lifecycle.remove("live", ["synth-11-000002"], tmp_path)
        assert c.get("/items/synth-11-000002").status_code == 404
        ids = [r["id"] for r in c.post("/search", json={"text": QUERY, "k": 50}).json()["results"]]
        assert len(ids) == 44 and "synth-11-000002" not in ids
