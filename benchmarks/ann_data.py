"""ann_peers.py's data: a mixture fitted to the demo model's real embeddings, real queries.

See ann_peers.py's docstring for the method. Also the run settings shared by its modules.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from retrieval.index import autoindex
from retrieval.index.exact import exact_search

D, K, TARGET = 128, 10, 0.95
MODEL = ("tiny-vit", "retrieval/model/weights/tiny-vit-shapes.pt")
TUNING_QUERIES = autoindex.TUNING_QUERIES
THREADS = 2


def real_embeddings(work: Path, n_images: int) -> dict[str, np.ndarray]:
    """Images and distinct captions of a synthetic corpus, encoded by the demo model (cached)."""
    cache = work / f"real-{n_images}.npz"
    if cache.exists():
        return dict(np.load(cache))
    import torch

    from retrieval.corpus import synthetic
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec

    torch.set_num_threads(THREADS)
    corpus = synthetic.generate(work / f"corpus-{n_images}", n=n_images, seed=0)
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    encoder = Encoder.load(ModelSpec(*MODEL), "cpu")
    images, _, failed = encoder.encode_image_files([corpus.parent / r["image"] for r in records])
    assert not failed, failed
    scene_of = {c: r["scene"] for r in records for c in r["captions"]}
    texts = sorted(scene_of)
    out = {
        "images": images,
        "captions": encoder.encode_texts(texts),
        "caption_scene": np.array([scene_of[t] for t in texts]),
        "caption_strings": len([c for r in records for c in r["captions"]]),
    }
    np.savez(cache, **out)
    return out


def fit_mixture(real: np.ndarray, centres: int, seed: int = 0) -> dict[str, np.ndarray]:
    """k-means centres, each real vector's cluster and residual, and the residuals' covariance
    factor (the jitter's shape)."""
    import faiss

    km = faiss.Kmeans(D, centres, niter=25, seed=seed, verbose=False)
    km.train(real)
    assign = km.index.search(real, 1)[1][:, 0]
    residuals = real - km.centroids[assign]
    cov = np.cov(residuals.T).astype(np.float64)
    shape = np.linalg.cholesky(cov + 1e-9 * np.eye(D)) / np.sqrt(np.trace(cov))
    return {
        "centres": km.centroids,
        "assign": assign,
        "residuals": residuals,
        "shape": shape.astype(np.float32),
    }


def sample_mixture(mix: dict, n: int, jitter: float, seed: int) -> np.ndarray:
    """(n, D) unit vectors: centre + real residual x U(0.85, 1.15) + jitter, the jitter
    Gaussian with the real residuals' covariance scaled to an expected norm of ``jitter``."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, D), np.float32)
    for s in range(0, n, 200_000):
        m = min(200_000, n - s)
        j = rng.integers(0, len(mix["residuals"]), m)
        scale = rng.uniform(0.85, 1.15, (m, 1)).astype(np.float32)
        x = mix["centres"][mix["assign"][j]] + scale * mix["residuals"][j]
        x += np.float32(jitter) * (rng.standard_normal((m, D), dtype=np.float32) @ mix["shape"].T)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def nn_similarity(base: np.ndarray, probes: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of each probe to its nearest base vector (itself excluded if None)."""
    self_probe = probes is None
    probes = base[: min(len(base), 2000)] if self_probe else probes
    found = chunked_exact(base, probes, 2)
    return np.array([f.scores[1 if self_probe else 0] for f in found])


def local_dimension(x: np.ndarray, k: int = 10) -> float:
    """Median Levina-Bickel MLE of the intrinsic dimension from 10 neighbours (2,000 probes)."""
    found = chunked_exact(x, x[: min(len(x), 2000)], k + 1)
    dims = []
    for f in found:
        dist = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * f.scores[1 : k + 1].astype(np.float64)))
        dist = dist[dist > 0]
        if len(dist) >= 3:
            dims.append(-1.0 / np.mean(np.log(dist[:-1] / dist[-1])))
    return float(np.median(dims))


def quantiles(x: np.ndarray) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(x, q)), 4) for q in (10, 50, 90)}


def structure(x: np.ndarray, queries: np.ndarray) -> dict:
    """NN similarity quantiles, local dimension, and the queries' best similarity to ``x``."""
    return {
        "n": len(x),
        "nn_similarity": quantiles(nn_similarity(x)),
        "local_dimension": round(local_dimension(x), 1),
        "query_top1_similarity": quantiles(nn_similarity(x, queries)),
    }


def calibrate_jitter(real: np.ndarray, mix: dict) -> float:
    """The jitter at which a real-sized sample has the real set's median NN similarity."""
    want = np.median(nn_similarity(real))
    lo, hi = 0.0, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        got = np.median(nn_similarity(sample_mixture(mix, len(real), mid, seed=7)))
        lo, hi = (mid, hi) if got > want else (lo, mid)
    return (lo + hi) / 2


def split_queries(real: dict, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tuning and evaluation caption vectors, disjoint by scene; 500 tuning queries. Both in
    random order: the captions come sorted, and neighbouring captions (the same scene in other
    words) visit the same graph nodes, which would flatter latency with warm caches."""
    rng = np.random.default_rng(seed)
    scenes = np.unique(real["caption_scene"])
    rng.shuffle(scenes)
    pool = np.isin(real["caption_scene"], scenes[: len(scenes) // 4])
    tune_rows = rng.choice(np.flatnonzero(pool), TUNING_QUERIES, replace=False)
    eval_rows = rng.permutation(np.flatnonzero(~pool))
    return real["captions"][tune_rows], real["captions"][eval_rows]


def ground_truth(base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(Q, K) ids of the exact top-K by the engine's `exact_search` (ties by lower id)."""
    return np.stack([f.ids for f in chunked_exact(base, queries, K)])


def chunked_exact(base: np.ndarray, queries: np.ndarray, k: int, step: int = 500) -> list:
    """`exact_search` 500 queries at a time: FAISS's tiles hold queries x N scores (2 GB)."""
    ids = np.arange(len(base))
    return [
        f
        for s in range(0, len(queries), step)
        for f in exact_search(base, ids, queries[s : s + step], k)
    ]


def prepare(args: argparse.Namespace) -> dict:
    """Write base.npy, the query sets and their ground truth under ``args.work``; describe them."""
    start = time.perf_counter()
    real = real_embeddings(args.work, args.images)
    mix = fit_mixture(real["images"], args.centres)
    jitter = calibrate_jitter(real["images"], mix)
    base = sample_mixture(mix, args.n, jitter, seed=1)
    tune_q, eval_q = split_queries(real)
    arrays = {
        "base": base,
        "tune_q": tune_q,
        "eval_q": eval_q,
        "tune_truth": ground_truth(base, tune_q),
        "eval_truth": ground_truth(base, eval_q),
    }
    for name, x in arrays.items():
        np.save(args.work / f"{name}.npy", x)
    os.sync()  # no write-back to disk during the timings
    small = sample_mixture(mix, len(real["images"]), jitter, seed=2)
    return {
        "real_images": len(real["images"]),
        "caption_strings": int(real["caption_strings"]),
        "distinct_captions": len(real["captions"]),
        "scenes": len(np.unique(real["caption_scene"])),
        "centres": args.centres,
        "jitter_norm": round(jitter, 4),
        "tuning_queries": len(tune_q),
        "eval_queries": len(eval_q),
        "structure": {
            "real images": structure(real["images"], eval_q),
            "mixture sample, as many as the real images": structure(small, eval_q),
            "mixture base (the indexed set)": structure(base, eval_q),
        },
        "prepare_s": round(time.perf_counter() - start, 1),
    }
