"""Text-query latency of each runtime: what a search by text waits for before the index.

From the repository root:

    .venv/bin/python benchmarks/text_query.py --json benchmarks/results/text_query.json

One run, for ViT-B-32 (random weights, seed 0, as a local checkpoint: no download) and the
shipped effnet-minilm (MiniLM's text tower), each runtime (torch fp32, onnx fp32, onnx int8):

- single: ``Encoder.encode_texts([caption])`` for each of ``--queries`` coco-mini captions in
  turn (real lengths, 8 to 30 tokens), after 10 untimed ones; p50 and p90 in ms;
- batch of 32: ``encode_texts(32 captions)``, ``--queries / 32`` times; p50 per batch in ms.

Model load and the first ONNX export are not timed. Target: the single query of the fastest
runtime that keeps the quality guard >= 2x faster than torch fp32, per model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from build_speed import make_checkpoint
from machine import background_cores, describe

from retrieval.model.encoder import Encoder
from retrieval.model.onnx.cache import ENV_CACHE
from retrieval.model.runtime import ALL_RUNTIMES
from retrieval.model.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT.parent / "shared" / "data" / "coco-mini" / "captions.json"
TARGET = 2.0


def captions(n: int) -> list[str]:
    records = json.loads(CAPTIONS.read_text())
    return [c for r in records for c in r["captions"]][:n]


def timings(encoder: Encoder, texts: list[str]) -> dict[str, float]:
    for t in texts[:10]:
        encoder.encode_texts([t])
    single = []
    for t in texts:
        start = time.perf_counter()
        encoder.encode_texts([t])
        single.append(1000 * (time.perf_counter() - start))
    batches = []
    for i in range(0, len(texts) - 31, 32):
        start = time.perf_counter()
        encoder.encode_texts(texts[i : i + 32])
        batches.append(1000 * (time.perf_counter() - start))
    deciles = statistics.quantiles(single, n=10)
    return {
        "single_p50_ms": round(statistics.median(single), 2),
        "single_p90_ms": round(deciles[-1], 2),
        "batch32_p50_ms": round(statistics.median(batches), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=320)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    info, idle = describe(), background_cores()
    print(json.dumps(info), f"\nother processes before the run: {idle:.2f} cores busy")
    texts = captions(args.queries)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="text-query-") as name:
        os.environ[ENV_CACHE] = str(Path(name) / "cache")
        models = {
            "ViT-B-32 (random)": ModelSpec("ViT-B-32", str(make_checkpoint(Path(name)))),
            "effnet-minilm": ModelSpec("effnet-minilm"),
        }
        for label, spec in models.items():
            results[label] = {}
            for runtime in ALL_RUNTIMES:
                encoder = Encoder.load(spec, "cpu", runtime)
                results[label][str(runtime)] = timings(encoder, texts)
                print(label, runtime, results[label][str(runtime)], flush=True)
                del encoder
    head = ("model", "runtime", "single p50", "p90", "x torch", "batch32")
    print("\n{:<20} {:<11} {:>10} {:>7} {:>7} {:>8}".format(*head))
    for label, rows in results.items():
        base = rows["torch fp32"]["single_p50_ms"]
        for runtime, r in rows.items():
            speedup = base / r["single_p50_ms"]
            print(
                f"{label:<20} {runtime:<11} {r['single_p50_ms']:>10} {r['single_p90_ms']:>7} "
                f"{speedup:>7.2f} {r['batch32_p50_ms']:>8}"
            )
    if args.json:
        report = {"machine": info, "background_cores_before": round(idle, 2)}
        report |= {"queries": len(texts), "target_single_speedup": TARGET, "results": results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
