"""ONNX Runtime encoders (`retrieval.model.onnx`): agreement with torch, the graph cache, the
runtime recorded in the manifest and followed by later commands."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from retrieval.cli import main
from retrieval.corpus import synthetic
from retrieval.errors import EncoderError, IndexBuildError, SearchError
from retrieval.eval.bench import run_bench
from retrieval.eval.config import BenchConfig
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.index.lifecycle import add
from retrieval.index.manifest import read_manifest
from retrieval.index.verify import verify
from retrieval.model.encoder import Encoder
from retrieval.model.onnx.cache import ENV_CACHE, cache_root
from retrieval.model.runtime import Runtime, RuntimeChoice
from retrieval.model.spec import ModelSpec, demo_model
from retrieval.query.search import Query, Searcher

pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")

ONNX_FP32, ONNX_INT8 = Runtime("onnx", "fp32"), Runtime("onnx", "int8")
# Mixed lengths: empty, one word, long enough to be cut at the context length.
TEXTS = ["", "a red circle", "two small blue squares above a large green triangle " * 12, "x y"]
# Measured on these inputs (benchmarks/README.md has the figures on real data): int8 moves the
# demo model's embeddings least, MiniLM's text tower most.
INT8_MIN_COSINE = {"tiny-vit": (0.999, 0.995), "effnet-minilm": (0.995, 0.95)}  # image, text


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(n)
    sizes = [(40 + 13 * i, 30 + 7 * i) for i in range(n)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1)


def test_a_choice_fills_what_it_leaves_out():
    int8 = Runtime("onnx", "int8")
    assert RuntimeChoice().over(int8) == int8  # nothing asked: the index's
    assert RuntimeChoice(precision="int8").over() == int8  # int8 exists on ONNX Runtime only
    assert RuntimeChoice("onnx").over(int8) == int8  # the runtime's precision kept
    assert RuntimeChoice("onnx").over() == Runtime("onnx", "fp32")
    assert RuntimeChoice("torch").over(int8) == Runtime()
    assert RuntimeChoice(precision="fp32").over(int8) == Runtime("onnx", "fp32")
    with pytest.raises(EncoderError, match="runs on ONNX Runtime: add --runtime onnx"):
        RuntimeChoice("torch", "int8").over()
    assert Runtime.from_json(None) == Runtime()  # manifests written before runtimes


@pytest.fixture(scope="module")
def demo_torch() -> Encoder:
    return Encoder.load(demo_model(), "cpu")


@pytest.mark.parametrize("spec", [demo_model(), ModelSpec("effnet-minilm")], ids=lambda s: s.name)
def test_onnx_agrees_with_torch_on_the_shipped_models(spec):
    torch_enc = Encoder.load(spec, "cpu")
    fp32, int8 = Encoder.load(spec, "cpu", ONNX_FP32), Encoder.load(spec, "cpu", ONNX_INT8)
    assert fp32.runtime == ONNX_FP32 and int8.runtime == ONNX_INT8
    for n in (1, 3):  # awkward batch sizes: the graphs' batch axis is dynamic
        pics = images(n)
        ref_img, ref_txt = torch_enc.encode_pil(pics), torch_enc.encode_texts(TEXTS[:n])
        assert cosines(fp32.encode_pil(pics), ref_img).min() > 1 - 1e-4
        assert cosines(fp32.encode_texts(TEXTS[:n]), ref_txt).min() > 1 - 1e-4
        low_img, low_txt = INT8_MIN_COSINE[spec.name]
        assert cosines(int8.encode_pil(pics), ref_img).min() > low_img
        assert cosines(int8.encode_texts(TEXTS[:n]), ref_txt).min() > low_txt
    # The re-ranker's inputs, from the same graphs: token states, their mask, patch tokens.
    got, want = fp32.text_query(TEXTS), torch_enc.text_query(TEXTS)
    assert got[1].shape == want[1].shape and bool((got[2] == want[2]).all())
    np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), atol=2e-4)
    patches, ref_patches = fp32.image_query(images(2))[1], torch_enc.image_query(images(2))[1]
    np.testing.assert_allclose(patches.numpy(), ref_patches.numpy(), atol=2e-4)


def test_an_int8_text_does_not_depend_on_its_batch(demo_torch):
    int8 = Encoder.load(demo_model(), "cpu", ONNX_INT8)
    batch = int8.encode_texts(TEXTS)
    alone = np.concatenate([int8.encode_texts([t]) for t in TEXTS])
    np.testing.assert_allclose(batch, alone, atol=1e-6)
    states, mask = int8.text_states(TEXTS)  # padded back to the batch's length
    assert states.shape[:2] == mask.shape and not bool(states[~mask].any())


def test_without_onnxruntime_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what a failed import leaves
    with pytest.raises(EncoderError, match=r"pip install 'retrieval\[onnx\]'"):
        Encoder.load(demo_model(), "cpu", ONNX_FP32)


def _graphs() -> set:
    return {p.parent for p in (cache_root() / "onnx").glob("*/image.fp32.onnx")}


def test_new_weights_get_new_graphs_and_a_corrupt_graph_is_rebuilt(caplog, demo_torch):
    Encoder.load(demo_model(), "cpu", ONNX_FP32)
    before = _graphs()
    Encoder.load(ModelSpec("tiny-vit", random_init=True), "cpu", ONNX_FP32)  # other weights
    (new,) = _graphs() - before
    graph = new / "image.fp32.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: still a loadable graph, wrong weights
    graph.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = Encoder.load(ModelSpec("tiny-vit", random_init=True), "cpu", ONNX_FP32)
    assert "is corrupt or incomplete: making it again" in caplog.text
    (new / "text.fp32.onnx.sha256").unlink()  # a graph without its digest is not trusted either
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Encoder.load(ModelSpec("tiny-vit", random_init=True), "cpu", ONNX_FP32)
    assert "text.fp32.onnx is corrupt" in caplog.text
    reference = Encoder.load(ModelSpec("tiny-vit", random_init=True), "cpu")
    assert cosines(again.encode_pil(images(2)), reference.encode_pil(images(2))).min() > 1 - 1e-4


@pytest.fixture(scope="module")
def onnx_index(tmp_path_factory, synth_corpus):
    root = tmp_path_factory.mktemp("ix")
    config = BuildConfig(model=demo_model(), progress=False, runtime=RuntimeChoice("onnx"))
    build(synth_corpus, "o", config, index_dir=root)
    return root


def test_the_manifest_records_the_runtime_and_later_commands_follow_it(onnx_index):
    manifest = read_manifest(onnx_index / "o")
    assert manifest.runtime == ONNX_FP32
    with Searcher.open("o", onnx_index) as s:
        assert s.encoder.runtime == ONNX_FP32
        onnx_hits = s.search(Query(text="a red circle"), k=5)["results"]
    # Another runtime of the same weights is accepted, and finds the same.
    with Searcher.open("o", onnx_index, runtime=RuntimeChoice("torch")) as s:
        assert s.encoder.runtime == Runtime()
        torch_hits = s.search(Query(text="a red circle"), k=5)["results"]
    assert [h["id"] for h in onnx_hits] == [h["id"] for h in torch_hits]
    assert verify("o", onnx_index, sample=4).ok  # re-encoded by the index's runtime
    other = ModelSpec("tiny-vit", random_init=True)
    with pytest.raises(SearchError, match="was built with model tiny-vit"):
        Searcher.open("o", onnx_index, model=other, runtime=RuntimeChoice("onnx"))


def test_info_shows_the_runtime(onnx_index):
    args = ["info", "o", "--index-dir", str(onnx_index)]
    assert "runtime   onnx fp32" in CliRunner().invoke(main, args, catch_exceptions=False).output
    as_json = CliRunner().invoke(main, [*args, "--json"], catch_exceptions=False).output
    assert json.loads(as_json)["runtime"] == {"engine": "onnx", "precision": "fp32"}
    # The command line's options reach the searcher: int8 alone means ONNX Runtime.
    query = ["search", "o", "--text", "a red circle", "--json", "--index-dir", str(onnx_index)]
    for extra in ([], ["--precision", "int8"], ["--runtime", "torch"]):
        out = CliRunner().invoke(main, query + extra, catch_exceptions=False).stdout
        assert len(json.loads(out)["results"]) == 10  # stderr: the first int8 use's bars
    bad = CliRunner().invoke(main, [*query, "--runtime", "torch", "--precision", "int8"])
    assert bad.exit_code == 1 and "runs on ONNX Runtime: add --runtime onnx" in bad.output


def test_bench_gives_a_row_per_runtime_with_cosines_to_torch(synth_corpus):
    config = BenchConfig(model=demo_model(), progress=False, runtime_rows=True, workers=0)
    result = run_bench(synth_corpus, config)
    rows = {r.strategy: r.metrics for r in result.rows}
    for name in ("exact [torch fp32]", "exact [onnx fp32]", "exact [onnx int8]"):
        assert "image_retrieval_recall@1" in rows[name]
    assert rows["exact [torch fp32]"]["text_cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert rows["exact [onnx fp32]"]["image_cosine_min"] > 1 - 1e-4
    assert 0.99 < rows["exact [onnx int8]"]["text_cosine_mean"] < 1.0
    exact = rows["exact"]
    assert (
        rows["exact [torch fp32]"]["image_retrieval_recall@5"] == exact["image_retrieval_recall@5"]
    )


def test_one_index_holds_one_precision(tmp_path, synth_corpus):
    config = BuildConfig(model=demo_model(), progress=False, runtime=RuntimeChoice("onnx"))
    build(synth_corpus, "p", config, index_dir=tmp_path)
    more = synthetic.generate(tmp_path / "more", n=3, seed=11)
    int8 = replace(config, runtime=RuntimeChoice(precision="int8"))
    with pytest.raises(IndexBuildError, match="one index holds one precision"):
        add(more, "p", tmp_path, int8)
    torch_fp32 = replace(config, runtime=RuntimeChoice("torch"))  # the same vectors: accepted
    assert add(more, "p", tmp_path, torch_fp32, upsert=True).path.exists()
    assert read_manifest(tmp_path / "p").runtime == ONNX_FP32


def test_a_manifest_with_an_unknown_runtime_is_a_damaged_index(tmp_path, synth_corpus):
    build(synth_corpus, "m", BuildConfig(model=demo_model(), progress=False), index_dir=tmp_path)
    path = tmp_path / "m" / "manifest.json"
    data = json.loads(path.read_text())
    data["runtime"] = {"engine": "tensorrt", "precision": "fp32"}
    path.chmod(0o644)
    path.write_text(json.dumps(data))
    with pytest.raises(SearchError, match="manifest.json is unreadable.*runtime"):
        Searcher.open("m", tmp_path)


def test_two_processes_making_the_same_graphs_at_once_both_succeed(tmp_path):
    """The first use of the same weights by two processes (torchrun's ranks, a build beside a
    search): each graph is made once, under the cache's lock, and both load it."""
    code = (
        "from retrieval.model.encoder import Encoder; from retrieval.model.runtime import Runtime;"
        "from retrieval.model.spec import demo_model;"
        "e = Encoder.load(demo_model(), 'cpu', Runtime('onnx', 'int8'));"
        "print(e.encode_texts(['a red circle'])[0, :4].tolist())"
    )
    env = {**os.environ, ENV_CACHE: str(tmp_path / "cache")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    (folder,) = (tmp_path / "cache" / "onnx").iterdir()
    assert sorted(p.name for p in folder.glob("*.onnx")) == [
        "image.fp32.onnx", "image.int8.onnx", "text.fp32.onnx", "text.int8.onnx",
    ]  # fmt: skip
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))
