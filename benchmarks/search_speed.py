"""Search speed of the engine's indexes on embedding-like vectors, against exact search.

    python benchmarks/search_speed.py --sizes 100000 1000000

Data: N x 512 unit vectors shaped like CLIP embeddings rather than isotropic noise: a shared
mean direction (embeddings sit in a narrow cone), ~sqrt(N) clusters, each spread along a
decaying spectrum plus a few random directions of its own; queries come from the same
generator (not from the base set), shifted by a fixed "modality gap" vector.

For each index: build time, bytes per vector, and for batches of 1-1000 queries (`BATCHES`):
queries/s, p50/p99 batch latency and recall@10 against exact search. The machine's GEMM
throughput is measured in the same run (at its start and end, and around each exact row's
batch size: `of_gemm` is that row's GFLOP/s over the mean of the two GEMMs around it), and
exact search is compared with it and with FAISS's default flat search (which uses BLAS only
from 250 queries up at d=512).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from unittest import mock

import faiss
import numpy as np
import torch
from machine import describe

from retrieval.index import exact, vector_index
from retrieval.index.vector_index import VectorIndex, choose_factory

D, K = 512, 10
BATCHES = (1, 16, 32, 64, 128, 256, 1000)


def embeddings(n: int, seed: int, gap: float = 0.0) -> np.ndarray:
    """(n, D) float32 unit vectors with CLIP-like structure (see the module docstring)."""
    rng = np.random.default_rng(12345)  # the same clusters for base and queries
    n_clusters = max(8, int(np.sqrt(n)))
    mean = rng.standard_normal(D).astype(np.float32)
    centres = rng.standard_normal((n_clusters, D)).astype(np.float32) * 0.6 + 2.0 * mean / 22.6
    spectrum = (1.0 / np.sqrt(1 + np.arange(D))).astype(np.float32)
    extra = rng.standard_normal((n_clusters, 4, D)).astype(np.float32) * 0.05
    gap_dir = rng.standard_normal(D).astype(np.float32)
    draw = np.random.default_rng(seed)
    out = np.empty((n, D), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        c = draw.integers(0, n_clusters, m)
        x = centres[c] + 0.5 * draw.standard_normal((m, D)).astype(np.float32) * spectrum
        x += np.einsum("mk,mkd->md", draw.standard_normal((m, 4)).astype(np.float32), extra[c])
        x += gap * gap_dir / np.linalg.norm(gap_dir)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


# numpy's OpenBLAS threads busy-wait ~0.1 s (2**28 cycles) after a product before they sleep,
# holding a CPU: searches timed right after the reference GEMM ran ~40% slower for their first
# ~100 ms (15-16 ms against 11 ms per 16-query batch at 100k; gone with
# OPENBLAS_THREAD_TIMEOUT=4). The reference must not slow what it is compared with.
BLAS_SETTLE_S = 0.3


def gemm_gflops() -> float:
    """The machine's GEMM throughput (best of 5, 4096 x 512 by 512 x 8192 through numpy, whose
    OpenBLAS is faster here than torch's MKL); returns once BLAS's threads are idle again."""
    a = np.random.default_rng(0).standard_normal((4096, D), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((D, 8192), dtype=np.float32)
    best = np.inf
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    time.sleep(BLAS_SETTLE_S)
    return 2 * 4096 * D * 8192 / best / 1e9


def shape_gemm_gflops(xb: np.ndarray, queries: np.ndarray) -> dict[int, float]:
    """GFLOP/s of the bare product, no top-k, at exact search's own shapes (N x D by D x nq):
    what BLAS itself reaches on a skinny product, the best of numpy and torch, both
    orientations."""
    base, out = torch.from_numpy(xb), {}
    for nq in BATCHES[1:]:
        q = np.ascontiguousarray(queries[:nq])
        qt = torch.from_numpy(q)
        operands = ((xb, q.T), (q, xb.T), (base, qt.T), (qt, base.T))
        best = np.inf
        for a, b in operands:
            a @ b  # warm-up
            for _ in range(3):
                start = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - start)
        out[nq] = round(2 * nq * len(xb) * D / best / 1e9, 1)
    return out


def read_bandwidth_gbs() -> float:
    """GB/s of one pass over a 1 GiB float32 array: the roofline of small-batch exact search."""
    x = np.ones(1 << 28, dtype=np.float32)
    best = np.inf
    for _ in range(3):
        start = time.perf_counter()
        torch.from_numpy(x).sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def time_batches(search, queries: np.ndarray, nq: int, min_s: float = 2.0) -> list[float]:
    times, start, i = [], time.perf_counter(), 0
    search(queries[:nq])  # warm-up
    while len(times) < 5 or (time.perf_counter() - start < min_s and len(times) < 200):
        rows = (np.arange(nq) + i * nq) % len(queries)
        q = np.ascontiguousarray(queries[rows])
        t = time.perf_counter()
        search(q)
        times.append(time.perf_counter() - t)
        i += 1
    return times


def recall_at_10(ids: list[np.ndarray], truth: list[np.ndarray]) -> float:
    return float(
        np.mean([len(set(a[:K]) & set(b[:K])) / K for a, b in zip(ids, truth, strict=True)])
    )


def measure(
    name: str, search, queries, truth, n: int, build_s: float, nbytes: int, gemm: bool = False
) -> dict:
    """One row; ``gemm``: measure GEMM just before and after each batch size too, as the
    exact rows' reference (this VM's GEMM drifts by 10-40% within minutes)."""
    row = {
        "index": name,
        "build_s": round(build_s, 2),
        "bytes_per_vector": round(nbytes / n, 1),
        "recall@10": round(recall_at_10(search(queries[:1000]), truth), 4),
        "batches": {},
    }
    for nq in BATCHES:
        before = gemm_gflops() if gemm else None
        times = np.array(time_batches(search, queries, nq))
        gflops = 2 * nq * n * D / times.mean() / 1e9
        row["batches"][nq] = {
            "qps": round(nq / times.mean(), 1),
            "p50_ms": round(1e3 * np.percentile(times, 50), 3),
            "p99_ms": round(1e3 * np.percentile(times, 99), 3),
            "gflops": round(gflops, 1),
        }
        if gemm:
            after = gemm_gflops()
            row["batches"][nq]["gemm_gflops_around"] = [round(before, 1), round(after, 1)]
            row["batches"][nq]["of_gemm"] = round(gflops / ((before + after) / 2), 3)
    print(name, json.dumps(row))
    return row


def engine_rows(xb: np.ndarray, queries: np.ndarray, truth, factories) -> list[dict]:
    rows = []
    for name, factory, knob in factories:
        start = time.perf_counter()
        vi = VectorIndex.build(xb, np.arange(len(xb)), factory)
        build_s = time.perf_counter() - start
        nbytes = faiss.serialize_index(vi.cpu_index).nbytes
        start = time.perf_counter()
        vi.search(queries[:16], K)  # a flat index packs its vectors on its first batch
        first_batch_s = time.perf_counter() - start
        packed_s = None
        if vi._packed is not None:
            packed_s = round(first_batch_s, 3)
            print(f"{name}: packed for batches in {first_batch_s:.2f} s (first batch of 16)")
            nbytes += vi._packed.blocks.nbytes
        for label, value in knob or [(None, None)]:
            if label:
                _set_knob(vi, label, value)

            def search(q, vi=vi):
                return [nb.ids for nb in vi.search(q, K)]

            title = f"{name} ({factory}{', ' + label + '=' + str(value) if label else ''})"
            flat = factory == "Flat"
            rows.append(measure(title, search, queries, truth, len(xb), build_s, nbytes, flat))
            rows[-1]["first_batch_with_packing_s"] = packed_s
    return rows


def _set_knob(vi: VectorIndex, label: str, value: int) -> None:
    if label == "efSearch":
        faiss.downcast_index(vi.cpu_index.index).hnsw.efSearch = value
    else:
        faiss.extract_index_ivf(vi.cpu_index).nprobe = value


def faiss_default_flat(xb, queries, truth) -> dict:
    start = time.perf_counter()
    index = faiss.IndexFlatIP(D)
    index.add(xb)
    build_s = time.perf_counter() - start

    def search(q):
        return list(index.search(q, K)[1])

    return measure(
        "faiss IndexFlatIP, default BLAS threshold",
        search,
        queries,
        truth,
        len(xb),
        build_s,
        len(xb) * D * 4,
        gemm=True,
    )


def earlier_exact(xb, queries, truth, untiled: bool) -> dict:
    """The engine's exact search as it was: one step back, FAISS's tiled BLAS search from 16
    queries up and no packed base; two steps back (``untiled``), one BLAS product over all N
    vectors and torch's top-k below FAISS's BLAS threshold."""
    never = 1 << 62
    name = "exact, untiled (before)" if untiled else "exact, FAISS tiled (before)"
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(vector_index, "PACK_MIN_VECTORS", never))
        if untiled:
            stack.enter_context(mock.patch.object(exact, "TILED_MIN_QUERIES", never))
        [row] = engine_rows(xb, queries, truth, [(name, "Flat", None)])
    return row


def run_size(n: int, with_hnsw: bool, exact_only: bool) -> dict:
    xb, queries = embeddings(n, seed=1), embeddings(5000, seed=2, gap=0.3)
    exact = VectorIndex.build(xb, np.arange(n), "Flat")
    truth = [nb.ids for nb in exact.search(queries[:1000], K)]
    nlist = int(4 * np.sqrt(n))
    factories = [
        ("exact", "Flat", None),
        ("auto", choose_factory(n), None),
        ("ivf", f"IVF{nlist},Flat", [("nprobe", p) for p in (8, 16, 32, 64)]),
    ]
    if with_hnsw:
        factories.insert(2, ("hnsw", "HNSW32", [("efSearch", e) for e in (32, 64, 128, 256)]))
    rows = engine_rows(xb, queries, truth, factories[:1] if exact_only else factories)
    rows.append(earlier_exact(xb, queries, truth, untiled=False))
    rows.append(earlier_exact(xb, queries, truth, untiled=True))
    rows.append(faiss_default_flat(xb, queries, truth))
    return {"n": n, "rows": rows, "shape_gemm_gflops": shape_gemm_gflops(xb, queries)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--hnsw-max", type=int, default=200_000, help="skip HNSW builds above this N")
    ap.add_argument("--exact-only", action="store_true", help="only the exact-search rows")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/search_speed.json"))
    args = ap.parse_args()
    report = {
        "machine": describe(),
        "gemm_gflops": round(gemm_gflops(), 1),
        "read_gbs": round(read_bandwidth_gbs(), 1),
    }
    print("GEMM GFLOP/s:", report["gemm_gflops"], "read GB/s:", report["read_gbs"])
    report["sizes"] = [run_size(n, n <= args.hnsw_max, args.exact_only) for n in args.sizes]
    report["gemm_gflops_after"] = round(gemm_gflops(), 1)  # drift of the machine over the run
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
