"""Embeddings export (#30 item 4): every format reads back to the index's own vectors and ids,
chunk by chunk (an awkward chunk size here), in float16 or float32."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.cli import main
from retrieval.index import layout
from retrieval.index.build import build
from retrieval.index.config import BuildConfig, ExportConfig
from retrieval.index.embeddings import load_embeddings
from retrieval.index.export import export
from retrieval.index.store import Store


@pytest.fixture(scope="module")
def index(tmp_path_factory, synth_corpus, encoder):
    root = tmp_path_factory.mktemp("export")
    build(synth_corpus, "e", BuildConfig(progress=False, workers=0), root, encoder=encoder)
    return root


@pytest.fixture(scope="module")
def truth(index):
    """Per item id: (image vector, [(caption id, text, vector)], path, extra), from the index."""
    folder = layout.resolve("e", index)
    emb = load_embeddings(folder, mmap=False)
    unit = lambda x: x.astype(np.float32) / np.linalg.norm(x.astype(np.float32))  # noqa: E731
    out = {}
    with Store.open(folder / layout.STORE) as store:
        for it in store.iter_items():
            caps = [
                (c["id"], c["text"], unit(emb.caption[store.caption(c["id"])["row"]]))
                for c in it["captions"]
            ]
            out[it["id"]] = (unit(emb.image[it["row"]]), caps, it["path"], it.get("extra", {}))
    return out


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_npz_reads_back(index, truth, tmp_path, dtype):
    n = export("e", tmp_path / "e.npz", ExportConfig("npz", dtype, chunk=7), index)
    got = np.load(tmp_path / "e.npz")
    assert n == len(truth) == len(got["ids"]) and got["image"].dtype == np.dtype(dtype)
    at = 0
    for row, item in enumerate(got["ids"]):
        image, caps, path, extra = truth[str(item)]
        np.testing.assert_allclose(got["image"][row].astype(np.float32), image, atol=2e-3)
        assert got["paths"][row] == path and json.loads(got["extra"][row]) == extra
        for cid, text, vec in caps:
            assert got["caption_ids"][at] == cid and got["caption_text"][at] == text
            assert got["caption_item"][at] == row
            np.testing.assert_allclose(got["caption"][at].astype(np.float32), vec, atol=2e-3)
            at += 1
    assert at == len(got["caption"])


def test_parquet_reads_back(index, truth, tmp_path):
    import pyarrow.parquet as pq

    export("e", tmp_path / "e.parquet", ExportConfig("parquet", "float32", chunk=7), index)
    table = pq.read_table(tmp_path / "e.parquet").to_pylist()
    assert len(table) == len(truth)
    for row in table:
        image, caps, path, extra = truth[row["id"]]
        assert json.loads(row["extra"]) == extra
        np.testing.assert_allclose(np.array(row["image_embedding"]), image, atol=2e-3)
        assert row["captions"] == [t for _, t, _ in caps] and row["path"] == path
        for got, (_, _, vec) in zip(row["caption_embeddings"], caps, strict=True):
            np.testing.assert_allclose(np.array(got), vec, atol=2e-3)


def test_clip_retrieval_layout_reads_back(index, truth, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "cr"
    args = ["embeddings", "e", str(out), "--index-dir", str(index)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and f"wrote {len(truth)} items" in result.output
    images = np.load(out / "img_emb" / "img_emb_0.npy")
    texts = np.load(out / "text_emb" / "text_emb_0.npy")
    meta = pq.read_table(out / "metadata" / "metadata_0.parquet").to_pylist()
    assert images.dtype == np.float16 and len(images) == len(texts) == len(meta) == len(truth)
    for i, row in enumerate(meta):
        image, caps, path, _ = truth[row["id"]]
        assert row["image_path"] == path and row["caption"] == caps[0][1]
        np.testing.assert_allclose(images[i].astype(np.float32), image, atol=2e-3)
        np.testing.assert_allclose(texts[i].astype(np.float32), caps[0][2], atol=2e-3)


def test_an_unknown_format_is_refused(index, tmp_path):
    result = CliRunner().invoke(main, ["embeddings", "e", str(tmp_path / "x"), "--format", "csv"])
    assert result.exit_code == 2 and "csv" in result.output


def test_outputs_that_cannot_be_written_are_one_line(index, tmp_path):
    stale = tmp_path / "old"
    (stale / "img_emb").mkdir(parents=True)
    (tmp_path / "afile").write_text("x")
    cases = [
        (stale, "clip-retrieval", "is not an empty folder"),
        (tmp_path / "afile", "clip-retrieval", "is not an empty folder"),
        (tmp_path, "npz", "is a folder: --format npz writes one file"),
    ]
    for out, fmt, words in cases:
        args = ["embeddings", "e", str(out), "--format", fmt, "--index-dir", str(index)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and words in result.output and "Traceback" not in result.output
    # A single file is replaced whole.
    target = tmp_path / "e.npz"
    export("e", target, ExportConfig("npz"), index)
    export("e", target, ExportConfig("npz", "float32"), index)
    assert np.load(target)["image"].dtype == np.float32
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
