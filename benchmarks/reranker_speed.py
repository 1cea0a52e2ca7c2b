"""What `search --rerank N` costs: a plain text query against the same query re-ranked, with the
candidates' patch tokens stored in the index (``build --patch-tokens``) or decoded again.

Two models: the demo model (tiny-vit and its shipped re-ranker) and ViT-B-32-sized towers with
random weights and a random re-ranker of the default size (speed only). Each builds a synthetic
index twice (with and without stored patches) and runs the same queries through
`Searcher.search`, end to end (encoding the query included).

    python benchmarks/reranker_speed.py --out benchmarks/results/reranker_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from machine import describe

from retrieval.corpus import synthetic
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.model import reranker as rr
from retrieval.model.checkpoints import save_checkpoint
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec, RerankerConfig, demo_model
from retrieval.query.search import Query, Searcher
from retrieval.train.itm import new_reranker


def random_pair(name: str, folder: Path) -> ModelSpec:
    """A checkpoint of ``name`` with random weights and a random default-size re-ranker."""
    enc = Encoder.load(ModelSpec(name, random_init=True), "cpu")
    reranker = new_reranker(enc.model, enc.tokenizer, RerankerConfig())
    path = folder / f"{name}-random.pt"
    save_checkpoint(
        {"state_dict": enc.model.state_dict(), "reranker": rr.payload(reranker, enc.model)}, path
    )
    return ModelSpec(name, str(path))


def latency(searcher: Searcher, queries: list[str], rerank: int | None) -> dict[str, float]:
    for q in queries[:3]:  # warm-up
        searcher.search(Query(text=q), k=10, rerank=rerank)
    times = []
    for q in queries:
        start = time.perf_counter()
        searcher.search(Query(text=q), k=10, rerank=rerank)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"p50_ms": statistics.median(times), "p90_ms": times[int(0.9 * len(times)) - 1]}


def measure(spec: ModelSpec, corpus: Path, root: Path, n_queries: int, rerank: int) -> dict:
    config = BuildConfig(model=spec, progress=False)
    build(corpus, "stored", replace(config, patch_tokens=True), index_dir=root)
    build(corpus, "decoded", config, index_dir=root)
    texts = [
        c for line in corpus.read_text().splitlines() for c in json.loads(line)["captions"][:1]
    ][:n_queries]
    out = {}
    with Searcher.open("stored", root) as s:
        patches = s.reranking().patches
        out["bytes_per_item"] = int(patches[0].nbytes)
        out["patch_shape"] = list(patches.shape[1:])
        out["plain"] = latency(s, texts, None)
        out[f"rerank{rerank}_stored"] = latency(s, texts, rerank)
    with Searcher.open("decoded", root, encoder=None) as s:
        out[f"rerank{rerank}_decoded"] = latency(s, texts[: max(20, n_queries // 5)], rerank)
    for way in ("stored", "decoded"):
        key = f"rerank{rerank}_{way}"
        out[key]["x_plain_p50"] = out[key]["p50_ms"] / out["plain"]["p50_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--rerank", type=int, default=20)
    ap.add_argument("--big", default="ViT-B-32", help="the towers measured for speed only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {"machine": describe(), "rerank": args.rerank}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = synthetic.generate(tmp / "corpus", n=args.images, seed=999)
        result["demo"] = measure(demo_model(), corpus, tmp / "a", args.queries, args.rerank)
        big = random_pair(args.big, tmp)
        small = synthetic.generate(tmp / "small", n=min(args.images, 300), seed=999)
        result[args.big] = measure(big, small, tmp / "b", min(args.queries, 60), args.rerank)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
