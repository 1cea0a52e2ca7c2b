"""Vector queries (#30 item 2): an embedding computed elsewhere is searched like the text or
image it came from, from Python, the command line and HTTP; a bad vector is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from retrieval.cli import main
from retrieval.errors import SearchError
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.query.search import Query, QueryTerm, Searcher
from retrieval.serve.app import create_app

TEXT = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def index(tmp_path_factory, synth_corpus, encoder):
    root = tmp_path_factory.mktemp("vectors")
    build(synth_corpus, "v", BuildConfig(progress=False, workers=0), root, encoder=encoder)
    return root


@pytest.fixture(scope="module")
def searcher(index, encoder):
    with Searcher.open("v", index, encoder=encoder) as s:
        yield s


def ranked(out: dict) -> list[tuple[str, float]]:
    """Ids and scores, to float rounding (a vector renormalised differs in the last bit)."""
    return [(r["id"], round(r["score"], 4)) for r in out["results"]]


def test_a_vector_finds_what_its_text_finds(searcher, encoder):
    vector = encoder.encode_texts([TEXT])[0]
    for strategy in ("cosine", "qbnorm", "hybrid"):
        by_text = searcher.search(Query(text=TEXT), k=7, strategy=strategy)
        by_vector = searcher.search(Query(vector=vector * 3.0), k=7, strategy=strategy)  # any norm
        assert ranked(by_vector) == ranked(by_text), strategy
    assert set(by_vector["results"][0]["scores"]) == {"v2i", "v2t"}  # hybrid's two signals
    # As a term of a composed query: the same as the text term it stands for.
    composed = Query(text="a blue square", terms=(QueryTerm(vector=vector, weight=-0.4),))
    reference = Query(text="a blue square", terms=(QueryTerm(text=TEXT, weight=-0.4),))
    assert ranked(searcher.search(composed, k=5)) == ranked(searcher.search(reference, k=5))


@pytest.mark.parametrize(
    ("vector", "words"),
    [
        (np.ones(7), "has 7 numbers; index 'v' holds 128-d vectors"),
        (np.full(128, np.nan), "NaN or infinite"),
        (np.zeros(128), "all zeros"),
        (["a"] * 128, "a list of numbers"),
        (np.ones((2, 64)), r"one vector, not an array of \(2, 64\)"),
    ],
)
def test_a_bad_vector_is_one_line(searcher, vector, words):
    with pytest.raises(SearchError, match=words) as err:
        searcher.search(Query(vector=vector))
    assert "\n" not in str(err.value)


def test_an_embedding_query_stands_alone():
    with pytest.raises(SearchError, match="stands alone"):
        Query(text="x", vector=[1.0, 0.0])


def test_the_command_line_reads_npy_and_json(index, encoder, tmp_path):
    vector = encoder.encode_texts([TEXT])[0]
    np.save(tmp_path / "q.npy", vector[None, :])  # (1, D) is one vector too
    (tmp_path / "q.json").write_text(json.dumps(vector.tolist()))

    def ids(*args):
        result = CliRunner().invoke(main, ["search", "v", *args, "--json", "--index-dir", index])
        assert result.exit_code == 0, result.output
        return [r["id"] for r in json.loads(result.output)["results"]]

    want = ids("--text", TEXT, "--model", "tiny-vit", "--random-init")
    assert ids("--vector", tmp_path / "q.npy") == want
    assert ids("--vector", tmp_path / "q.json") == want
    assert ids("--text", "x", "--term", f"vector:1:{tmp_path / 'q.npy'}", "--strategy", "arith")
    bad = CliRunner().invoke(main, ["search", "v", "--vector", tmp_path / "q.json", "--text", "x"])
    assert bad.exit_code == 2 and "--vector stands alone" in bad.output
    (tmp_path / "m.json").write_text("[[1, 2], [3, 4]]")
    bad = CliRunner().invoke(main, ["search", "v", "--vector", tmp_path / "m.json"])
    assert bad.exit_code == 2 and "one vector of numbers" in bad.output


def test_http_takes_an_embedding(searcher, encoder):
    vector = encoder.encode_texts([TEXT])[0]
    with TestClient(create_app(searcher)) as client:
        got = client.post("/search", json={"embedding": vector.tolist(), "k": 5}).json()
        want = client.post("/search", json={"text": TEXT, "k": 5}).json()
        assert [r["id"] for r in got["results"]] == [r["id"] for r in want["results"]]
        short = client.post("/search", json={"embedding": [0.5] * 3})
        assert short.status_code == 400 and "has 3 numbers" in short.json()["error"]
        both = client.post("/search", json={"embedding": vector.tolist(), "text": "x"})
        assert both.status_code == 400 and "stands alone" in both.json()["error"]
