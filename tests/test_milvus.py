"""The Milvus backend on milvus-lite (the Milvus engine embedded): filters with the FAISS
backend's semantics, the same rankings as the FAISS backend, every change, and the command line.

The server path (HTTP URIs, two processes, the cross-process lock) is in test_milvus_server.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from retrieval.cli import main
from retrieval.corpus import filters, synthetic
from retrieval.errors import RetrievalError
from retrieval.index import lifecycle
from retrieval.index.build import build
from retrieval.index.config import BuildConfig, ExportConfig
from retrieval.index.export import export
from retrieval.index.milvus import collections as coll
from retrieval.index.milvus.backend import grace_s
from retrieval.index.milvus.client import connect
from retrieval.index.milvus.where import FIELD, expression, filter_doc
from retrieval.index.repair import rollback
from retrieval.index.verify import verify
from retrieval.query.search import Query, QueryTerm, Searcher

CONFIG = BuildConfig(progress=False, workers=0, shard_size=16, batch_size=16)
MILVUS = replace(CONFIG, backend="milvus")


# --- filters --------------------------------------------------------------------------------

VALUES = [
    "red",
    "blue",
    3,
    7.5,
    "3",
    "12",
    "x y",
    'say "hi"',
    True,
    ["red", 3],
    ["blue"],
    [],
    "inf",
]
CONDITIONS = [
    "colour=red", "colour=3", "colour!=red", "colour!=3", "size>3", "size>=3", "size<7.5",
    "size<=12", "size=3..8", "size=-1..3", "colour=True", 'colour=say "hi"', "colour=x y",
    "size!=blue", "colour>2", "size=inf", 'odd"key"][\\=red', 'odd"key"][\\>2',
]  # fmt: skip


def test_where_expressions_select_what_the_faiss_backend_selects(tmp_path):
    rng = np.random.default_rng(0)
    extras = []
    for _ in range(300):
        extra = {}
        for key in ("colour", "size", 'odd"key"][\\'):
            if rng.random() < 0.8:  # some items lack the field
                extra[key] = VALUES[rng.integers(len(VALUES))]
        extras.append(extra)
    client = connect(str(tmp_path / "f.db"))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    from pymilvus import DataType

    schema.add_field("row", DataType.INT64, is_primary=True)
    schema.add_field(FIELD, DataType.JSON)
    schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
    params = client.prepare_index_params()
    params.add_index("v", index_type="FLAT", metric_type="L2")
    client.create_collection("f", schema=schema, index_params=params)
    client.insert(
        "f", [{"row": i, FIELD: filter_doc(e), "v": [0.0, 0.0]} for i, e in enumerate(extras)]
    )
    conds = [filters.parse(c) for c in CONDITIONS]
    pairs = [(a,) for a in conds] + [(a, b) for a, b in zip(conds, conds[3:], strict=False)]
    for where in pairs:
        want = {i for i, e in enumerate(extras) if filters.matches_all(where, e)}
        got = client.query("f", filter=expression(where), output_fields=["row"], limit=1000)
        assert {r["row"] for r in got} == want, [c for c in where]
    client.close()


# --- both backends, one ranking -------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory, encoder):
    """One corpus built on both backends (exact index types on both)."""
    root = tmp_path_factory.mktemp("pair")
    corpus = synthetic.generate(root / "c", n=60, seed=11)
    build(corpus, "f", CONFIG, root / "ix", encoder=encoder)
    build(corpus, "m", MILVUS, root / "ix", encoder=encoder)
    return corpus, root / "ix"


def _queries(corpus: Path) -> list[tuple[Query, dict]]:
    image = str(next((corpus.parent / "images").glob("*.png")))
    vector = np.random.default_rng(1).standard_normal(128)
    return [
        (Query(text="a red circle left of a blue square"), {}),
        (Query(image=image), {}),
        (Query(text="a green triangle", image=image, image_weight=0.3), {}),
        (Query(text="a red square", terms=(QueryTerm(text="blue", weight=-0.4),)), {}),
        (Query(vector=vector), {}),
        (Query(text="a yellow circle"), {"where": ("colours=red",)}),
        (Query(text="a square"), {"where": ("relation!=above", "shapes=square")}),
    ]


@pytest.mark.parametrize("strategy", ["cosine", "qbnorm", "hybrid", "hybrid-rrf", "arith"])
@pytest.mark.parametrize("target", ["images", "captions"])
def test_both_backends_return_the_same_top_10(pair, encoder, strategy, target):
    corpus, root = pair
    with (
        Searcher.open("f", root, encoder=encoder) as f,
        Searcher.open("m", root, encoder=encoder) as m,
    ):
        for query, extra in _queries(corpus):
            args = {"k": 10, "strategy": strategy, "target": target, **extra}
            want, got = f.search(query, **args), m.search(query, **args)
            every = f.search(query, **{**args, "k": 60})["results"]
            _same_ranking(got["results"], want["results"], every, query)


def _same_ranking(got: list[dict], want: list[dict], every: list[dict], query) -> None:
    """The same results in the same order with the same scores. Where two items tie (the
    synthetic corpus repeats captions), either may come first, or last in: a different id
    is accepted only where the FAISS backend's full ranking gives it the same score."""
    assert len(got) == len(want), query
    scores = np.array([r["score"] for r in want])
    np.testing.assert_allclose([r["score"] for r in got], scores, atol=1e-5, err_msg=str(query))
    exact = {r["id"]: r["score"] for r in every}
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a["id"] != b["id"]:  # a tie, or a wrong item
            assert exact[a["id"]] == pytest.approx(b["score"], abs=2e-6), (i, query)
            continue
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
        assert (a.get("caption"), a["extra"], a["path"]) == (
            b.get("caption"),
            b["extra"],
            b["path"],
        )


def test_dedup_and_unknown_fields_behave_as_on_faiss(pair, encoder):
    _, root = pair
    with (
        Searcher.open("f", root, encoder=encoder) as f,
        Searcher.open("m", root, encoder=encoder) as m,
    ):
        q = Query(text="a blue square")
        assert [r["id"] for r in m.search(q, dedup=0.9)["results"]] == [
            r["id"] for r in f.search(q, dedup=0.9)["results"]
        ]
        for s in (f, m):
            with pytest.raises(Exception, match="no item has the field 'colour'"):
                s.search(q, where=("colour=red",))


# --- changes --------------------------------------------------------------------------------


def _ids(searcher: Searcher, n: int = 1000) -> list[str]:
    return sorted(r["id"] for r in searcher.search(Query(text="a shape"), k=n)["results"])


def test_add_upsert_remove_compact_change_only_what_they_name(tmp_path, encoder):
    corpus = synthetic.generate(tmp_path / "a", n=30, seed=2)
    more = synthetic.generate(tmp_path / "b", n=12, seed=4)
    root = tmp_path / "ix"
    for name, config in (("f", CONFIG), ("m", MILVUS)):
        build(corpus, name, config, root, encoder=encoder)
        report = lifecycle.add(more, name, root, config, encoder=encoder)
        assert (report.added, report.replaced) == (12, 0)
        again = lifecycle.add(more, name, root, config, encoder=encoder)
        assert again.added == 0 and sum(again.skipped.values()) == 12
        edited = tmp_path / f"edit-{name}.jsonl"
        rows = [json.loads(line) for line in more.read_text().splitlines()[:3]]
        for r in rows:
            r["captions"] = ["an edited caption"]
            r["image"] = str(more.parent / r["image"])
        edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
        up = lifecycle.add(edited, name, root, config, encoder=encoder, upsert=True)
        assert (up.added, up.replaced) == (0, 3)
        gone = lifecycle.remove(name, [rows[0]["id"], "no-such-id"], root)
        assert gone.removed == 1 and gone.missing == ["no-such-id"]
        lifecycle.compact(name, root)
    with (
        Searcher.open("f", root, encoder=encoder) as f,
        Searcher.open("m", root, encoder=encoder) as m,
    ):
        assert _ids(m) == _ids(f) and len(_ids(m)) == 30 + 12 - 1
        assert (
            m.store.counts()["items"] == 41
            and m.store.counts()["captions"] == f.store.counts()["captions"]
        )
        hit = m.search(Query(text="an edited caption"), target="captions", k=41)["results"]
        edited_ids = {r["id"] for r in rows[1:]}
        assert edited_ids <= {r["id"] for r in hit if r["captions"] == ["an edited caption"]}
        for strategy in ("cosine", "qbnorm", "hybrid"):
            q = Query(text="a red circle")
            assert [r["id"] for r in m.search(q, strategy=strategy)["results"]] == [
                r["id"] for r in f.search(q, strategy=strategy)["results"]
            ]
    report = verify("m", root, sample=4, encoder=encoder)
    assert report.ok, report.summary()


def test_a_rebuild_switches_the_alias_and_keeps_one_previous_version(tmp_path, encoder):
    corpus = synthetic.generate(tmp_path / "a", n=20, seed=2)
    root = tmp_path / "ix"
    for _ in range(3):
        build(corpus, "m", MILVUS, root, encoder=encoder)
    client = connect(str(root / ".milvus" / "m.db"))
    names = coll.Names(coll.base_name("m"))
    assert coll.current(client, names) == names.items(3)
    assert coll.versions(client, names) == [names.items(2), names.items(3)]
    client.close()
    # The way back is the version Milvus kept: the aliases move to it.
    assert rollback("m", root) == f"Milvus collection {names.items(2)}"
    with Searcher.open("m", root, encoder=encoder) as s:
        assert s.space.refresh().items == names.items(2) and len(_ids(s)) == 20
    with pytest.raises(RetrievalError, match="lives in Milvus"):
        export("m", tmp_path / "out", ExportConfig(), root)
    with pytest.raises(RetrievalError, match="no earlier version"):  # v1 went with the 3rd build
        rollback("m", root)
    build(corpus, "m", MILVUS, root, encoder=encoder)  # keeps what readers used: v2, not v3
    client = connect(str(root / ".milvus" / "m.db"))
    assert coll.versions(client, names) == [names.items(2), names.items(4)]
    client.close()


def test_index_names_milvus_cannot_spell_apart_get_their_own_collections():
    names = ["a-b", "a.b", "a_b", "a", "a_v2", "x" * 120, "x" * 121]
    bases = [coll.base_name(n) for n in names]
    assert len(set(bases)) == len(names)
    assert coll.Names(coll.base_name("a")).items(2) not in {
        coll.Names(b).items_alias for b in bases
    }


# --- the command line -----------------------------------------------------------------------


def _as_csv(corpus: Path, out: Path) -> Path:
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    lines = ["filepath,title,relation"]
    lines += [f"{corpus.parent / r['image']},{r['captions'][0]},{r['relation']}" for r in rows]
    out.write_text("\n".join(lines) + "\n")
    return out


def _as_folder(corpus: Path, out: Path) -> Path:
    for r in (json.loads(line) for line in corpus.read_text().splitlines()):
        dst = out / Path(r["image"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(corpus.parent / r["image"], dst)
        dst.with_suffix(".txt").write_text("\n".join(r["captions"]))
        dst.with_suffix(".json").write_text(json.dumps({"relation": r["relation"]}))
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "folder"])
def test_the_command_line_builds_searches_changes_and_verifies_on_milvus(tmp_path, fmt):
    synth = synthetic.generate(tmp_path / "s", n=16, seed=6)
    corpus = {"jsonl": lambda: synth, "csv": lambda: _as_csv(synth, tmp_path / "c.csv"),
              "folder": lambda: _as_folder(synth, tmp_path / "folder")}[fmt]()  # fmt: skip
    run = CliRunner().invoke
    ix = ["--index-dir", str(tmp_path / "ix")]
    tiny = ["--model", "tiny-vit", "--random-init", "--no-progress", "--workers", "0"]
    built = run(main, ["build", str(corpus), "--name", "cm", "--backend", "milvus", *tiny, *ix])
    assert built.exit_code == 0, built.output
    assert "FLAT (images)" in built.output
    found = run(main, ["search", "cm", "--text", "a red circle", "--where", "relation!=above",
                       "--json", "-k", "5", *ix])  # fmt: skip
    assert found.exit_code == 0, found.output
    results = json.loads(found.output)["results"]
    assert results and all(r["extra"]["relation"] != "above" for r in results)
    gone = results[0]["id"]
    assert run(main, ["remove", "cm", "--id", gone, *ix]).exit_code == 0
    info = run(main, ["info", "cm", *ix])
    assert (
        info.exit_code == 0 and "backend   milvus" in info.output and "items     15" in info.output
    )
    assert "remove" in info.output
    checked = run(main, ["verify", "cm", "--sample", "3", *ix])
    assert checked.exit_code == 0 and "verified: all checks passed" in checked.output, (
        checked.output
    )
    manifest = json.loads(
        next((tmp_path / "ix" / ".versions" / "cm").glob("*/manifest.json")).read_text()
    )
    assert manifest["backend"] == {
        "kind": "milvus",
        "uri": ".milvus/cm.db",
        "collections": coll.base_name("cm"),
    }


def test_milvus_options_are_refused_where_they_mean_nothing(tmp_path):
    corpus = synthetic.generate(tmp_path / "s", n=4, seed=6)
    run = CliRunner().invoke
    base = ["build", str(corpus), "--name", "x", "--index-dir", str(tmp_path / "ix")]
    result = run(main, [*base, "--milvus-uri", "http://localhost:19530"])
    assert result.exit_code == 2 and "--milvus-uri needs --backend milvus" in result.output
    result = run(main, [*base, "--backend", "milvus", "--max-memory", "1GB"])
    assert result.exit_code == 2 and "--max-memory is for --backend faiss" in result.output
    result = run(main, [*base, "--backend", "milvus", "--index", "HNSW32"])
    assert result.exit_code == 1 and "HNSW32" in result.output and "IVF_PQ" in result.output


def test_an_unreachable_milvus_is_one_line(tmp_path, monkeypatch):
    corpus = synthetic.generate(tmp_path / "s", n=4, seed=6)
    monkeypatch.setenv("MILVUS_TOKEN", "root:secret-token")
    args = ["build", str(corpus), "--name", "x", "--backend", "milvus", "--milvus-uri",
            "http://127.0.0.1:9", "--model", "tiny-vit", "--random-init", "--no-progress",
            "--workers", "0", "--index-dir", str(tmp_path / "ix")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and "cannot use Milvus at http://127.0.0.1:9" in line
    assert "secret-token" not in line and "Traceback" not in line
    assert not (tmp_path / "ix" / "x").exists()


def test_writers_wait_out_the_staleness_window_the_server_is_configured_with(monkeypatch):
    monkeypatch.delenv(coll.GRACEFUL_ENV, raising=False)
    assert grace_s("http://milvus:19530") == 5.0  # Milvus's default common.gracefulTime
    monkeypatch.setenv(coll.GRACEFUL_ENV, "1000")
    assert grace_s("http://milvus:19530") == 1.0
    monkeypatch.setenv(coll.GRACEFUL_ENV, "1s")
    with pytest.raises(RetrievalError, match=coll.GRACEFUL_ENV):
        grace_s("http://milvus:19530")
    assert grace_s(".milvus/x.db") == 0.0  # milvus-lite's reads are current


# --- a writer killed ------------------------------------------------------------------------


def _collections(root: Path) -> dict[str, dict[int, tuple]]:
    """Every row of both collections (visible or not): row -> (id, rounded vector)."""
    client = connect(str(root / ".milvus" / "x.db"))
    names = coll.Names(coll.base_name("x"))
    items = coll.current(client, names)
    coll.ensure_loaded(client, names.meta, items, names.captions_of(items))
    out = {}
    for kind, name in (("items", items), ("captions", names.captions_of(items))):
        rows = client.query(
            name, filter="row >= 0", output_fields=["row", "id", "vector"], limit=16384
        )
        out[kind] = {r["row"]: (r["id"], tuple(np.round(r["vector"], 5))) for r in rows}
    client.close()
    return out


def _visible(root: Path, encoder) -> list[str]:
    with Searcher.open("x", root, encoder=encoder) as s:
        return _ids(s)


def test_adds_killed_at_random_moments_end_as_the_uninterrupted_one(tmp_path, encoder):
    import multiprocessing as mp

    from fault_worker import job

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["retrieval.index.lifecycle", "retrieval.index.verify"])
    a = synthetic.generate(tmp_path / "a", n=24, seed=4)
    b = synthetic.generate(tmp_path / "b", n=40, seed=5)
    base = tmp_path / "base"
    build(a, "x", MILVUS, base, encoder=encoder)

    def run(root: Path, kill_after: float | None):
        recv, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=job, args=("add", b, root, "x", None, send))
        child.start()
        assert recv.poll(120) and recv.recv() == "started"
        child.join(kill_after if kill_after is not None else 120)
        if child.is_alive():
            child.kill()
            child.join()
        return recv.recv() if recv.poll() else None

    shutil.copytree(base, tmp_path / "whole", symlinks=True)
    done = run(tmp_path / "whole", None)
    assert done is not None and done[0] == "ok", done
    want, before = _collections(tmp_path / "whole"), _visible(base, encoder)
    after = _visible(tmp_path / "whole", encoder)
    outcomes = set()
    moments = [*np.random.default_rng(0).uniform(0, done[1], 7), done[1] * 2]  # the last: done
    for n, moment in enumerate(moments):
        root = tmp_path / f"run{n}"
        shutil.copytree(base, root, symlinks=True)
        run(root, moment)
        assert verify("x", root, sample=0).ok, f"kill at {moment:.2f}s"
        seen = _visible(root, encoder)
        assert seen in (before, after), f"kill at {moment:.2f}s"  # never half an add
        outcomes.add("added" if seen == after else "not yet")
        lifecycle.add(b, "x", root, CONFIG, encoder=encoder, resume=True)
        assert _collections(root) == want, f"kill at {moment:.2f}s"
        assert verify("x", root, sample=2, encoder=encoder).ok
        shutil.rmtree(root)
    assert outcomes == {"added", "not yet"}, outcomes


def test_the_http_api_and_page_serve_a_milvus_index_as_a_faiss_one(pair, encoder):
    from fastapi.testclient import TestClient

    from retrieval.serve.app import create_app

    _, root = pair
    hybrid = {"where": ["colours=red"], "strategy": "hybrid"}
    bodies = [{"text": "a red circle", "k": 5}, {"text": "a square", "k": 5, **hybrid}]
    answers = {}
    for name in ("f", "m"):
        with Searcher.open(name, root, encoder=encoder) as s, TestClient(create_app(s)) as c:
            answers[name] = [c.post("/search", json=b).json()["results"] for b in bodies]
            first = answers[name][0][0]["id"]
            item = c.get(f"/items/{first}")
            assert item.status_code == 200 and item.json()["id"] == first
            assert c.get(f"/items/{first}/image?size=32").status_code == 200
            assert c.get("/items/no-such-id").status_code == 404
            stats = c.get("/stats").json()
            assert stats["counts"]["items"] == 60 and c.get("/").status_code == 200
    for got, want in zip(answers["m"], answers["f"], strict=True):
        assert [r["id"] for r in got] == [r["id"] for r in want]
        assert [r["image_url"] for r in got] == [r["image_url"] for r in want]
