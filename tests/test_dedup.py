"""De-duplicated results (#30 item 3): near-copies fold into the better-ranked result, order
and distinct results are kept, and k distinct results come back when the index has them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import unit_rows
from fastapi.testclient import TestClient

from retrieval.cli import main
from retrieval.corpus import synthetic
from retrieval.errors import SearchError
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.query.search import Query, Searcher
from retrieval.scoring.dedup import fold
from retrieval.serve.app import create_app

TEXT = "a red circle left of a blue square"


def brute_fold(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """The reference: every pair compared, kept ones in rank order, nearest kept one wins."""
    owner, kept = [], []
    for i, v in enumerate(vectors):
        sims = [(float(vectors[j] @ v), j) for j in kept]
        best = max(sims, default=(-2.0, -1))
        owner.append(best[1] if best[0] >= threshold else i)
        if best[0] < threshold:
            kept.append(i)
    return np.array(owner)


@pytest.mark.parametrize(("n", "seed"), [(1, 0), (7, 1), (33, 2), (100, 3)])
def test_fold_matches_the_brute_force_reference(n, seed):
    base = unit_rows(max(1, n // 3), 16, seed)
    rng = np.random.default_rng(seed)
    noisy = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.05, (n, 16))
    vectors = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    for threshold in (0.5, 0.9, 0.99, 1.0):
        owner = fold(vectors, threshold)
        np.testing.assert_array_equal(owner, brute_fold(vectors, threshold))
        kept = np.flatnonzero(owner == np.arange(n))
        assert (owner[owner != np.arange(n)] < np.arange(n)[owner != np.arange(n)]).all()
        sims = vectors[kept] @ vectors[kept].T
        assert (sims[~np.eye(len(kept), dtype=bool)] < threshold).all()  # kept are distinct


@pytest.fixture(scope="module")
def copies(tmp_path_factory, encoder):
    """An index whose 30 items include 3 copies of each of its first 6 images, under new ids."""
    root = tmp_path_factory.mktemp("dedup")
    corpus = synthetic.generate(root / "c", n=30, seed=11)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    for r in list(rows[:6]):
        for c in range(3):
            copy = root / "c" / f"copy{c}-{r['id']}.png"
            shutil.copy(corpus.parent / r["image"], copy)
            rows.append({**r, "id": f"copy{c}-{r['id']}", "image": str(copy)})
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    build(corpus, "d", BuildConfig(progress=False, workers=0), root / "ix", encoder=encoder)
    return root / "ix", corpus


def test_dedup_keeps_order_and_k_distinct_results(copies, encoder):
    root, _ = copies
    with Searcher.open("d", root, encoder=encoder) as s:
        every = [r["id"] for r in s.search(Query(text=TEXT), k=48)["results"]]
        out = s.search(Query(text=TEXT), k=10, dedup=0.999)["results"]
        rows = {i: s.store.item(i)["row"] for i in every}
        emb = s.space.image_emb.astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [r["id"] for r in out]
    assert len(ids) == 10 and ids == [i for i in every if i in ids]  # same order, k distinct
    vec = {i: emb[rows[i]] for i in every}
    for a in ids:  # no two results are near-copies
        assert all(vec[a] @ vec[b] < 0.999 for b in ids if b != a)
    folded = {d: r["id"] for r in out for d in r["duplicates"]}
    # Every item ranked above the last result and not shown is folded into one shown above it.
    for i in every[: every.index(ids[-1])]:
        if i not in ids:
            owner = folded[i]
            assert every.index(owner) < every.index(i) and vec[owner] @ vec[i] >= 0.999
    for r in out:  # an original shown stands for all three of its copies
        if not r["id"].startswith("copy"):
            for c in range(3):
                copy = f"copy{c}-{r['id']}"
                assert copy in r["duplicates"] or copy not in every[: every.index(ids[-1])]


def test_dedup_is_refused_out_of_range_and_absent_by_default(copies, encoder):
    root, _ = copies
    with Searcher.open("d", root, encoder=encoder) as s:
        assert "duplicates" not in s.search(Query(text=TEXT), k=3)["results"][0]
        with pytest.raises(SearchError, match=r"cosine similarity in \(0, 1\]"):
            s.search(Query(text=TEXT), dedup=1.5)


def test_dedup_from_the_command_line_and_http(copies, encoder):
    root, _ = copies
    args = ["search", "d", "--text", TEXT, "--dedup", "--json", "--index-dir", str(root)]
    result = CliRunner().invoke(main, [*args, "--model", "tiny-vit", "--random-init"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)["results"]
    assert all("duplicates" in r for r in out) and any(r["duplicates"] for r in out)
    with Searcher.open("d", root, encoder=encoder) as s, TestClient(create_app(s)) as client:
        assert client.get("/stats").json()["default_dedup"] == 0.85
        got = client.post("/search", json={"text": TEXT, "k": 5, "dedup": 0.999}).json()
        assert len(got["results"]) == 5 and any(r["duplicates"] for r in got["results"])
        bad = client.post("/search", json={"text": TEXT, "dedup": 0})
        assert bad.status_code == 422
