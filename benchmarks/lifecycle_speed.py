"""What a change to a large index costs: add, remove, compact, verify at 100k items.

A 100k-item index (512-d, one caption per item, clustered vectors as in search_speed.py) is
written directly through the engine's own version writer, for a tiny open_clip architecture
with a 512-d embedding (random weights: only the costs matter here). Then, per index type:
`retrieval remove` of 100 items, `retrieval add` of 64 new images, `retrieval compact` and
`retrieval verify --sample 0` (these items are not their images' vectors, so nothing is
re-encoded). The reference is the cost of writing the index's files once, which any change
must at least pay in this copy-on-write design.

    .venv/bin/python benchmarks/lifecycle_speed.py            # -> results/lifecycle_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import machine
from search_speed import embeddings

from retrieval.corpus import synthetic
from retrieval.index import layout, lifecycle
from retrieval.index.config import DEFAULT_BETA, DEFAULT_M, BuildConfig
from retrieval.index.embeddings import Embeddings, save_embeddings
from retrieval.index.manifest import INDEX_FILES, Counts, IndexEntry, Manifest, QuerybankSettings
from retrieval.index.store import ItemEntry, Store
from retrieval.index.vector_index import VectorIndex
from retrieval.index.verify import verify
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec

CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 2, "layers": 2},
}


def write_index(root: Path, encoder: Encoder, n: int, factory: str, image: Path) -> float:
    """Publish an n-item index of synthetic vectors; the seconds its files took to write."""
    vectors = embeddings(n, seed=1)
    captions = embeddings(n, seed=2, gap=0.3)

    def fill(folder: Path) -> dict:
        for kind, x in (("image", vectors), ("caption", captions)):
            VectorIndex.build(x, np.arange(n), factory).save(folder / f"{kind}.faiss")
        zeros = np.zeros(n, np.float32)
        save_embeddings(folder, Embeddings(vectors, captions, np.arange(n), zeros, zeros))
        with Store.create(folder / layout.STORE) as store:
            store.put_items(
                ItemEntry(f"item{i}", i, str(image), ((f"item{i}#0", i, f"caption {i}"),))
                for i in range(n)
            )
        (folder / layout.SKIPPED).write_text("")
        return Manifest.new(
            "big",
            encoder.spec.identity(),
            dim=encoder.dim,
            context_length=encoder.context_length,
            indexes={k: IndexEntry(f, factory, n) for k, f in INDEX_FILES.items()},
            counts=Counts(items=n, captions=n),
            corpus="synthetic vectors",
            querybank=QuerybankSettings(DEFAULT_BETA, DEFAULT_M, "corpus"),
        )

    start = time.perf_counter()
    layout.commit(root, "big", fill)
    return time.perf_counter() - start


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(factory: str, n: int, encoder: Encoder, work: Path) -> dict:
    root = work / factory.replace(",", "_")
    more = synthetic.generate(work / f"more-{factory.replace(',', '_')}", n=64, seed=5)
    image = more.parent / "images" / "000000.png"
    write_s = write_index(root, encoder, n, factory, image)
    size = sum(p.stat().st_size for p in layout.resolve("big", root).rglob("*") if p.is_file())
    config = BuildConfig(progress=False, workers=0)
    gone = [f"item{i}" for i in range(0, n, n // 100)][:100]
    remove_s, _ = timed(lambda: lifecycle.remove("big", gone, root))
    add_s, report = timed(lambda: lifecycle.add(more, "big", root, config, encoder=encoder))
    compact_s, _ = timed(lambda: lifecycle.compact("big", root))
    verify_s, checked = timed(lambda: verify("big", root, sample=0))
    assert checked.ok, checked.summary()
    row = {
        "factory": factory,
        "items": n,
        "version_mib": round(size / 2**20, 1),
        "write_once_s": round(write_s, 2),
        "remove_100_s": round(remove_s, 2),
        "add_64_s": round(add_s, 2),
        "added": report.added,
        "compact_s": round(compact_s, 2),
        "verify_s": round(verify_s, 2),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lifecycle_speed.json"))
    args = parser.parse_args()
    print(json.dumps(machine.describe()))
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "tiny-512.json"
        config.write_text(json.dumps(CONFIG))
        encoder = Encoder.load(ModelSpec(str(config), random_init=True), "cpu")
        rows = [run(f, args.n, encoder, Path(tmp)) for f in ("Flat", "HNSW32", "IVF1024,Flat")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine.describe(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
