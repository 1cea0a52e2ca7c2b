"""ann_peers.py's libraries behind one interface: the engine, hnswlib, usearch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ann_data import TARGET, THREADS, D, K

from retrieval.index import autoindex

LADDER = autoindex._EF  # the engine's efSearch ladder, used for every library
CURVE = (10, 12, *LADDER)  # measured efforts: two lower steps, to bracket recall 0.95


def set_threads() -> None:
    """2 threads in every library that has a pool of its own (hnswlib and usearch take theirs
    per call)."""
    import faiss
    import torch

    faiss.omp_set_num_threads(THREADS)
    torch.set_num_threads(THREADS)


class Engine:
    """The engine's `VectorIndex`: exact ("Flat"), its `auto` choice, or HNSW at a given efC."""

    def __init__(self, vi) -> None:
        self.vi = vi

    @classmethod
    def build(cls, xb: np.ndarray, spec: dict) -> Engine:
        import faiss

        from retrieval.index import vector_index as engine_index
        from retrieval.index.vector_index import VectorIndex

        ids = np.arange(len(xb))
        if spec.get("efc") is None:  # exactly what the engine builds
            return cls(VectorIndex.build(xb, ids, spec["factory"]))
        # VectorIndex.build with one change: the construction effort
        inner = faiss.index_factory(D, spec["factory"], faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = spec["efc"]
        engine_index._default_search_params(inner)
        index = faiss.IndexIDMap2(inner)
        index.add_with_ids(xb, ids)
        return cls(VectorIndex(index, spec["factory"]))

    @classmethod
    def load(cls, path: Path, spec: dict) -> Engine:
        from retrieval.index.vector_index import VectorIndex

        return cls(VectorIndex.load(path, spec["factory"]))

    def query(self, q: np.ndarray):
        return self.vi.search(q, K)

    def raw_query(self, q: np.ndarray):
        """The same search, FAISS directly (no engine wrapper)."""
        return self.vi.cpu_index.search(q, K)

    @staticmethod
    def ids(found) -> np.ndarray:
        return np.stack([f.ids for f in found])

    def set_effort(self, value: int) -> None:
        self.vi.set_knob(value)

    def tune(self, xb, tune_q, truth) -> int | None:
        """`autoindex.tune`, the engine's own (given exactly the 500 tuning queries)."""
        chosen = autoindex.tune(self.vi, xb, tune_q, TARGET)
        return None if chosen is None else chosen["value"]

    def save(self, path: Path) -> None:
        self.vi.save(path)

    def construction(self) -> int | None:
        import faiss

        inner = faiss.downcast_index(self.vi.cpu_index.index)
        return int(inner.hnsw.efConstruction) if hasattr(inner, "hnsw") else None


class Hnswlib:
    def __init__(self, index) -> None:
        self.index = index
        self.index.set_num_threads(THREADS)

    @classmethod
    def build(cls, xb: np.ndarray, spec: dict) -> Hnswlib:
        import hnswlib

        index = hnswlib.Index(space="ip", dim=D)
        index.init_index(len(xb), ef_construction=spec["efc"], M=spec["m"], random_seed=100)
        index.add_items(xb, np.arange(len(xb)), num_threads=THREADS)
        return cls(index)

    @classmethod
    def load(cls, path: Path, spec: dict) -> Hnswlib:
        import hnswlib

        index = hnswlib.Index(space="ip", dim=D)
        index.load_index(str(path))
        return cls(index)

    def query(self, q: np.ndarray):
        return self.index.knn_query(q, k=K, num_threads=THREADS)

    @staticmethod
    def ids(found) -> np.ndarray:
        return found[0].astype(np.int64)

    def set_effort(self, value: int) -> None:
        self.index.set_ef(value)

    def tune(self, xb, tune_q, truth) -> int:
        return tune_by_rule(self, tune_q, truth)

    def save(self, path: Path) -> None:
        self.index.save_index(str(path))

    def construction(self) -> int:
        return int(self.index.ef_construction)


class Usearch:
    def __init__(self, index) -> None:
        self.index = index

    @classmethod
    def build(cls, xb: np.ndarray, spec: dict) -> Usearch:
        from usearch.index import Index

        index = Index(
            ndim=D, metric="ip", connectivity=spec["m"], expansion_add=spec["efc"], dtype="f32"
        )
        index.add(np.arange(len(xb)), xb, threads=THREADS)
        return cls(index)

    @classmethod
    def load(cls, path: Path, spec: dict) -> Usearch:
        from usearch.index import Index

        return cls(Index.restore(str(path)))

    def query(self, q: np.ndarray):
        return self.index.search(q, K, threads=THREADS)

    @staticmethod
    def ids(found) -> np.ndarray:
        return np.asarray(found.keys, dtype=np.int64).reshape(-1, K)

    def set_effort(self, value: int) -> None:
        self.index.expansion_search = value

    def tune(self, xb, tune_q, truth) -> int:
        return tune_by_rule(self, tune_q, truth)

    def save(self, path: Path) -> None:
        self.index.save(str(path))

    def construction(self) -> int:
        return int(self.index.expansion_add)


LIBRARIES = {"engine": Engine, "hnswlib": Hnswlib, "usearch": Usearch}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float((found[:, :, None] == truth[:, None, :]).any(2).sum(1).mean() / K)


def batch_recall(lib, queries: np.ndarray, truth: np.ndarray) -> float:
    """Recall@10, 500 queries a call (the exact path's tiles hold queries x N scores)."""
    found = [lib.ids(lib.query(queries[s : s + 500])) for s in range(0, len(queries), 500)]
    return round(recall(np.concatenate(found), truth), 4)


def tune_by_rule(lib, tune_q: np.ndarray, truth: np.ndarray) -> int:
    """`autoindex.tune`'s rule: the smallest ladder value reaching the target on tuning queries."""
    for value in LADDER:
        lib.set_effort(value)
        if batch_recall(lib, tune_q, truth) >= TARGET:
            return value
    return value


def recall_curve(lib, tuned: int | None, eval_q: np.ndarray, truth: np.ndarray) -> list[dict]:
    """Recall@10 on eval at every effort up to the tuned one, then on until it is >= 0.97."""
    if tuned is None:  # exact
        return [{"effort": None, "recall@10": batch_recall(lib, eval_q, truth)}]
    points = []
    for value in CURVE:
        lib.set_effort(value)
        points.append({"effort": value, "recall@10": batch_recall(lib, eval_q, truth)})
        if value >= tuned and points[-1]["recall@10"] >= 0.97:
            break
    return points
