"""The Milvus backend against the FAISS backend at 100k items, in one run.

A 100k-item index (512-d clustered vectors, one caption each, as in lifecycle_speed.py) is
written through each backend's own version writer: FAISS + LMDB files (Flat, HNSW32), and Milvus
collections on milvus-lite (FLAT, HNSW, IVF_FLAT) and on a Milvus 2.3 standalone server (the
PyPI package `milvus`, started here; HNSW). Then per index: `retrieval remove` of 100 items,
`retrieval add` of 64 images (encoding included), and the query path's latency (p50 over 200
embedding queries, k=10, through `Searcher.search`) with its recall@10 against exact search.

milvus-lite is a single-process engine and the server here shares the 2 cores with the client:
these are not cluster figures.

    .venv/bin/python benchmarks/milvus_backend.py          # -> results/milvus_backend.json
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import machine
from lifecycle_speed import CONFIG, timed, write_index
from search_speed import embeddings

from retrieval.corpus import synthetic
from retrieval.index import layout, lifecycle
from retrieval.index.config import DEFAULT_BETA, DEFAULT_M, BuildConfig
from retrieval.index.manifest import Counts, Manifest, QuerybankSettings
from retrieval.index.milvus import backend, writer
from retrieval.index.milvus import collections as coll
from retrieval.index.store import ItemEntry
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec
from retrieval.query.search import Query, Searcher


def write_milvus(root: Path, encoder: Encoder, n: int, index: str, uri: str | None, image: Path):
    """Publish an n-item Milvus-backed index of the same vectors; the seconds it took."""
    vectors, captions = embeddings(n, seed=1), embeddings(n, seed=2, gap=0.3)
    entries = [
        ItemEntry(f"item{i}", i, str(image), ((f"item{i}#0", i, f"caption {i}"),)) for i in range(n)
    ]
    config = BuildConfig(backend="milvus", milvus_uri=uri, index=index)
    zeros = np.zeros(n, np.float32)
    start = time.perf_counter()
    identity = encoder.spec.identity()
    model = coll.model_key(identity.model, identity.pretrained, None, identity.random_init)
    to = backend.Destination(root, "big", config, model)
    where, described = backend.write_build(
        to, writer.Vectors(entries, vectors, captions), (zeros, zeros)
    )

    def fill(folder: Path) -> Manifest:
        (folder / layout.SKIPPED).write_text("")
        return Manifest.new(
            "big", encoder.spec.identity(), dim=encoder.dim,
            context_length=encoder.context_length, indexes=described,
            counts=Counts(items=n, captions=n), corpus="synthetic vectors",
            querybank=QuerybankSettings(DEFAULT_BETA, DEFAULT_M, "corpus"), milvus=where,
        )  # fmt: skip

    layout.commit(root, "big", fill)
    return time.perf_counter() - start


def queries(n: int, count: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Queries near items (their vectors plus noise) and their exact top-10 item rows."""
    vectors = embeddings(n, seed=1)
    rng = np.random.default_rng(7)
    q = vectors[rng.choice(n, count, replace=False)] + rng.normal(0, 0.05, (count, 512))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    return q, np.argsort(-(q @ vectors.T), axis=1)[:, :10]


def search_figures(root: Path, encoder: Encoder, n: int) -> dict:
    q, exact = queries(n)
    times, recall = [], []
    with Searcher.open("big", root, encoder=encoder) as s:
        s.search(Query(vector=q[0]), k=10)  # warm: files mapped, collections loaded
        for vec, want in zip(q, exact, strict=True):
            start = time.perf_counter()
            got = s.search(Query(vector=vec), k=10)["results"]
            times.append(time.perf_counter() - start)
            rows = {int(r["id"][4:]) for r in got}
            recall.append(len(rows & set(want.tolist())) / 10)
    return {"query_p50_ms": round(1000 * float(np.median(times)), 2),
            "recall_at_10": round(float(np.mean(recall)), 4)}  # fmt: skip


def run(label: str, n: int, encoder: Encoder, work: Path, write) -> dict:
    root = work / label
    more = synthetic.generate(work / f"more-{label}", n=64, seed=5)
    image = more.parent / "images" / "000000.png"
    write_s = write(root, image)
    figures = search_figures(root, encoder, n)
    gone = [f"item{i}" for i in range(0, n, n // 100)][:100]
    remove_s, _ = timed(lambda: lifecycle.remove("big", gone, root))
    config = BuildConfig(progress=False, workers=0)
    add_s, report = timed(lambda: lifecycle.add(more, "big", root, config, encoder=encoder))
    assert report.added == 64, report.summary()
    row = {"index": label, "items": n, "write_s": round(write_s, 1), **figures,
           "remove_100_s": round(remove_s, 3), "add_64_s": round(add_s, 2)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/milvus_backend.json"))
    parser.add_argument("--no-server", action="store_true", help="milvus-lite only")
    parser.add_argument("--server-n", type=int, default=20_000, help="items on the server")
    args = parser.parse_args()
    print(json.dumps(machine.describe()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = work / "tiny-512.json"
        config.write_text(json.dumps(CONFIG))
        encoder = Encoder.load(ModelSpec(str(config), random_init=True), "cpu")
        n = args.n
        for factory in ("Flat", "HNSW32"):

            def faiss(root, img, f=factory):
                return write_index(root, encoder, n, f, img)

            rows.append(run(f"faiss {factory}", n, encoder, work, faiss))
        for index in ("FLAT", "HNSW", "IVF_FLAT"):

            def lite(root, img, i=index):
                return write_milvus(root, encoder, n, i, None, img)

            rows.append(run(f"milvus-lite {index}", n, encoder, work, lite))
        if not args.no_server:
            rows += _server_rows(args.server_n, encoder, work)
    reference = rows[0]["remove_100_s"]  # FAISS Flat at n items
    for row in rows:
        if row["items"] == n:
            row["remove_speedup_vs_faiss_flat"] = round(reference / row["remove_100_s"], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"machine": machine.describe(), "rows": rows}
    args.out.write_text(json.dumps(out, indent=2) + "\n")


def _server_rows(n: int, encoder: Encoder, work: Path) -> list[dict]:
    import milvus

    ports = {k: _free_port() for k in milvus.MilvusServer().config_keys if k.endswith("_port")}
    server = milvus.MilvusServer(**ports)
    server.set_base_dir(str(work / "milvus-data"))
    server.start()
    uri = f"http://127.0.0.1:{server.listen_port}"
    try:
        return [
            run(f"milvus server {index}", n, encoder, work,
                lambda root, img, i=index: write_milvus(root, encoder, n, i, uri, img))
            for index in ("HNSW",)
        ]  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()
