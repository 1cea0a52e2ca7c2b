"""`retrieval bench`: exact vs index rows, index mode, outputs that others can re-check."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.cli import main
from retrieval.corpus.records import ReadOptions
from retrieval.errors import RetrievalError
from retrieval.eval.bench import Embedded, ann_row, exact_row, run_bench
from retrieval.eval.config import BenchConfig
from retrieval.eval.report import to_json, write_outputs
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.model.spec import ModelSpec
from retrieval.scoring import metrics

TINY = ModelSpec("tiny-vit", random_init=True)


@pytest.fixture(scope="module")
def result_and_embeddings(synth_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "emb.npz"
    config = BenchConfig(
        model=TINY,
        factories=("HNSW32", "Flat"),
        group_key="scene",
        workers=0,
        progress=False,
        ks=(1, 3, 10),
    )
    return run_bench(synth_corpus, config, save_embeddings=out), np.load(out)


def test_exact_row_recomputes_from_the_saved_embeddings(result_and_embeddings):
    result, saved = result_and_embeddings
    again = metrics.retrieval_metrics(
        saved["image"], saved["text"], saved["text_to_image"], ks=(1, 3, 10)
    )
    assert result.row("exact").metrics == pytest.approx(again)
    assert saved["item_ids"].shape == (40,) and saved["text"].shape == (120, 128)


def test_flat_index_row_loses_nothing_and_grouped_row_is_at_least_exact(result_and_embeddings):
    result, _ = result_and_embeddings
    exact, flat = result.row("exact").metrics, result.row("index Flat").metrics
    for key, value in flat.items():
        # The same tie rule on both paths: a flat index loses nothing and gains nothing.
        assert value == pytest.approx(exact[key]), key
    grouped = result.row("exact, any image of the same scene").metrics
    assert grouped["image_retrieval_recall@1"] >= exact["image_retrieval_recall@1"]
    assert {r.strategy for r in result.rows} >= {"index HNSW32"}


def test_an_index_row_counts_ties_as_exact_does():
    # Equal caption texts under different images embed identically: the index must not
    # break those ties in the model's favour (it returns the lower row first).
    rng = np.random.default_rng(3)
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    image = unit(rng.normal(size=(30, 16)))
    owner = np.repeat(np.arange(30), 2)
    text = unit(image[owner] + 0.8 * rng.normal(size=(60, 16)))
    for a, b in [(1, 4), (5, 2), (20, 41), (33, 8), (50, 59)]:  # a caption copied to another image
        text[a] = text[b]
    emb = Embedded(image, text, owner, [str(i) for i in range(30)])
    exact, flat = exact_row(emb, (1, 5), 5), ann_row("Flat", emb, (1, 5), 5)
    assert flat.metrics == {k: pytest.approx(exact.metrics[k]) for k in flat.metrics}
    for key in ("image_retrieval", "text_retrieval"):
        np.testing.assert_allclose(flat.curves[key], exact.curves[key])


def test_unknown_group_key_and_empty_split_say_what_is_wrong(synth_corpus):
    with pytest.raises(RetrievalError, match="no item has the field 'nokey'"):
        run_bench(synth_corpus, BenchConfig(TINY, group_key="nokey", progress=False))
    config = BenchConfig(TINY, read=ReadOptions(split="nosuch"), progress=False)
    with pytest.raises(RetrievalError, match="no item with a caption to evaluate in split 'nos"):
        run_bench(synth_corpus, config)


def test_outputs_json_markdown_plot(result_and_embeddings, tmp_path):
    result, _ = result_and_embeddings
    write_outputs(result, tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["task"] == "zeroshot_retrieval"
    assert set(data["metrics"]) >= {
        "image_retrieval_recall@1",
        "text_retrieval_recall@10",
        "image_retrieval_mean_rank",
    }
    assert data == json.loads(json.dumps(to_json(result)))
    md = (tmp_path / "r.md").read_text().splitlines()
    assert md[0].startswith("| strategy |") and md[1].startswith("|---")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_of_a_built_index_through_the_cli(synth_corpus, encoder, tmp_path):
    build(
        synth_corpus,
        "b",
        BuildConfig(progress=False, workers=0),
        index_dir=tmp_path,
        encoder=encoder,
    )
    res = CliRunner().invoke(
        main,
        [
            "bench",
            str(synth_corpus),
            "--index",
            "b",
            "--index-dir",
            str(tmp_path),
            "--no-progress",
            "--json",
            str(tmp_path / "o.json"),
            "-k",
            "1,5",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "index Flat (built)" in res.output and "40 images, 120 captions" in res.output
    data = json.loads((tmp_path / "o.json").read_text())
    built = data["strategies"]["index Flat (built)"]
    for key, value in built.items():
        assert value >= data["metrics"][key] - 1e-9
    bad = CliRunner().invoke(main, ["bench", str(synth_corpus), "-k", "one"])
    assert bad.exit_code != 0 and "not a list of integers" in bad.output
