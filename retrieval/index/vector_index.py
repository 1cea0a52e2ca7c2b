"""FAISS indexes of unit vectors, searched by inner product (= cosine similarity).

With `exact`, the only module that touches FAISS. Callers give (N, D) float32 unit vectors
with int64 row ids and get back, per query, the ids and scores of its neighbours, best first,
without FAISS's -1 padding. Exact (flat) indexes are searched by `exact.exact_search`, several
times faster than FAISS's own flat search on small batches; a flat index of `PACK_MIN_VECTORS`
or more packs a copy of its vectors for batches (`packed.PackedBase`) on its first batched
search, which doubles its memory.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import faiss
import numpy as np

from ..errors import IndexBuildError, SearchError
from . import packed
from .exact import TILED_MIN_QUERIES, Neighbors, exact_search

log = logging.getLogger(__name__)

EXACT_LIMIT = 100_000  # below this many vectors exact search is both fast and perfect
SUBSET_LIMIT = 20_000  # filters allowing at most this many ids are searched exactly
# FAISS builds graphs at efConstruction 40; 200 (hnswlib's default) gives a graph that reaches
# recall@10 0.95 at a lower efSearch (1M x 128: efSearch 16 against 24 at 128, 40 much more),
# for 1.5x 128's build time, small beside encoding the images (benchmarks/README.md, "ANN
# against its peers").
HNSW_EF_CONSTRUCTION = 200
PACK_MIN_VECTORS = 8192  # below this a batch's BLAS product is quick enough as it is


def choose_factory(n: int) -> str:
    """The ``auto`` choice: exact below `EXACT_LIMIT` vectors, HNSW graph search over fp16
    vectors above (the choice by memory budget is `autoindex.choose`)."""
    return "Flat" if n < EXACT_LIMIT else "HNSW32,SQfp16"


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0


def _to_gpus(index: faiss.Index) -> faiss.Index:
    """A copy on every GPU, sharded; the CPU copy stays the one that is saved."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except (RuntimeError, AttributeError) as e:  # e.g. HNSW has no GPU version
        log.warning("searching on the CPU: this index type cannot move to the GPU (%s)", e)
        return index


def _check(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected an (N, D) array, got shape {x.shape}")
    return x


class VectorIndex:
    """A FAISS index with int64 ids; build with `VectorIndex.build` or `VectorIndex.load`."""

    def __init__(self, index: faiss.Index, factory: str, device: str = "cpu") -> None:
        self.cpu_index, self.factory, self.device = index, factory, device
        self._dead = np.zeros(0, np.int64)  # tombstoned ids, excluded from every search
        self._refresh()

    def _refresh(self) -> None:
        # Cached as Python ints: SWIG attribute reads cost microseconds on every query.
        self._ntotal, self._dim = int(self.cpu_index.ntotal), int(self.cpu_index.d)
        self._searcher = self.cpu_index
        if self.device.startswith("cuda") and gpu_count() > 0:
            self._searcher = _to_gpus(self.cpu_index)
        self._flat = self._exact_view() if self._searcher is self.cpu_index else None
        self._packed: packed.PackedBase | None = None  # made on the first batched search

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray,
        factory: str = "auto",
        device: str = "cpu",
        train: np.ndarray | None = None,
    ) -> VectorIndex:
        """Index ``vectors`` (N, D) under ``ids`` (N,); ``factory``: ``auto`` or FAISS syntax.

        ``train`` (T, D): what a quantiser learns from (default: ``vectors``).
        """
        vectors = _check(vectors)
        train = vectors if train is None else _check(train)
        n, d = vectors.shape
        factory = choose_factory(n) if factory == "auto" else factory
        try:
            inner = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1]
            raise IndexBuildError(f"bad FAISS factory string {factory!r}: {msg}") from None
        if not inner.is_trained:
            if n == 0:
                raise IndexBuildError(f"index {factory!r} needs training vectors; none were given")
            try:
                inner.train(train)
            except RuntimeError as e:
                msg = str(e).strip().splitlines()[-1]
                raise IndexBuildError(f"cannot train {factory!r} on {n} vectors: {msg}") from None
        _default_search_params(inner)
        if (hnsw := getattr(faiss.downcast_index(inner), "hnsw", None)) is not None:
            hnsw.efConstruction = max(hnsw.efConstruction, HNSW_EF_CONSTRUCTION)
        index = faiss.IndexIDMap2(inner)
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        with contextlib.suppress(RuntimeError):  # IVF: let filtered search reconstruct vectors
            faiss.extract_index_ivf(inner).make_direct_map()
        return cls(index, factory, device)

    @classmethod
    def load(cls, path: Path, factory: str, device: str = "cpu", mmap: bool = False) -> VectorIndex:
        """Read an index; ``mmap``: map it read-only instead (pages load as searches touch
        them, are shared between processes, and need not fit in RAM)."""
        if not mmap:
            return cls(faiss.read_index(str(path)), factory=factory, device=device)
        # IVF lists map with IO_FLAG_MMAP; flat codes (Flat, HNSW storage) with MMAP_IFC.
        flag = faiss.IO_FLAG_MMAP if "IVF" in factory else faiss.IO_FLAG_MMAP_IFC
        try:
            index = faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:
            log.info("reading %s into memory: it cannot be memory-mapped (%s)", path.name, e)
            index = faiss.read_index(str(path))
        return cls(index, factory=factory, device=device)

    def save(self, path: Path) -> None:
        faiss.write_index(self.cpu_index, str(path))

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` (N, D) under new ``ids`` (N,) int64 (an IVF keeps its centroids)."""
        vectors = _check(vectors)
        if len(vectors):
            self.cpu_index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        self._refresh()

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ``ids``; False when this index type cannot (HNSW, IVF): tombstone them then."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return True
        try:
            self.cpu_index.remove_ids(faiss.IDSelectorBatch(ids))
        except RuntimeError:
            return False
        self._refresh()
        return True

    def exclude(self, ids: np.ndarray) -> None:
        """Leave ``ids`` (tombstones) out of every search from now on."""
        self._dead = np.unique(np.asarray(ids, dtype=np.int64))

    def knob(self) -> str | None:
        """The search-effort parameter of this index type: efSearch, nprobe, or None (exact)."""
        inner = faiss.downcast_index(self.cpu_index.index)
        if hasattr(inner, "hnsw"):
            return "efSearch"
        return "nprobe" if self._ivf() is not None else None

    def set_knob(self, value: int) -> None:
        inner = faiss.downcast_index(self.cpu_index.index)
        if hasattr(inner, "hnsw"):
            inner.hnsw.efSearch = int(value)
        elif (ivf := self._ivf()) is not None:
            ivf.nprobe = int(value)
        self._refresh()  # a GPU copy takes the value with it

    def knob_value(self) -> int | None:
        inner = faiss.downcast_index(self.cpu_index.index)
        if hasattr(inner, "hnsw"):
            return int(inner.hnsw.efSearch)
        ivf = self._ivf()
        return int(ivf.nprobe) if ivf is not None else None

    def nlist(self) -> int:
        ivf = self._ivf()
        return int(ivf.nlist) if ivf is not None else 0

    def _ivf(self):
        try:
            return faiss.extract_index_ivf(self.cpu_index)
        except RuntimeError:
            return None

    @property
    def dead(self) -> np.ndarray:
        """(T,) int64 tombstoned ids this index leaves out of searches."""
        return self._dead

    def ids(self) -> np.ndarray:
        """(ntotal,) int64: every id the index holds, tombstoned ones included."""
        return faiss.vector_to_array(self.cpu_index.id_map).astype(np.int64)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), D) float32 stored vectors (approximate for compressed indexes)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(self.cpu_index.reconstruct_batch(ids), dtype=np.float32)

    @property
    def ntotal(self) -> int:
        return self._ntotal

    @property
    def dim(self) -> int:
        return self._dim

    def _exact_view(self):
        inner = faiss.downcast_index(self.cpu_index.index)
        if (
            not isinstance(inner, faiss.IndexFlat)
            or inner.metric_type != faiss.METRIC_INNER_PRODUCT
        ):
            return None
        n, d = inner.ntotal, inner.d
        # Views into FAISS's own memory: no copy, valid as long as the index lives.
        xb = (
            faiss.rev_swig_ptr(inner.get_xb(), n * d).reshape(n, d)
            if n
            else np.zeros((0, d), np.float32)
        )
        return xb, faiss.vector_to_array(self.cpu_index.id_map)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> list[Neighbors]:
        """The ``k`` best ids per query of ``queries`` (Q, D); fewer when the index is smaller.

        ``allowed`` (M,) int64: search only these ids (a metadata filter). A selective filter
        (M <= `SUBSET_LIMIT`) is searched exactly over the allowed vectors, which is both faster
        and more complete than a filtered graph walk; a broad one uses FAISS's ID selector.
        """
        queries = _check(queries)
        if queries.shape[1] != self._dim:
            raise ValueError(f"query dim {queries.shape[1]} != index dim {self._dim}")
        if not np.isfinite(queries).all():  # NaN scores never enter a top-k: rows would be lost
            raise SearchError("queries hold NaN or infinite values")
        if allowed is None and self._flat is None and not len(self._dead) and 0 < k <= self._ntotal:
            # The common ANN case, kept lean: at ~0.1 ms a query, Python's own steps show.
            scores, labels = self._searcher.search(queries, k)
            if len(queries) == 1 and labels[0, -1] >= 0:  # no -1 padding to strip
                return [Neighbors(labels[0], scores[0])]
            return _unpadded(scores, labels)
        if len(self._dead) and allowed is not None:
            allowed = np.setdiff1d(allowed, self._dead)
        if len(self._dead) and allowed is None:
            return self._search_live(queries, k)
        k = min(int(k), self.ntotal if allowed is None else len(allowed))
        if k <= 0:
            empty = Neighbors(np.zeros(0, np.int64), np.zeros(0, np.float32))
            return [empty] * len(queries)
        if self._flat is not None:
            xb, ids = self._flat
            if allowed is not None:
                keep = np.isin(ids, allowed)
                xb, ids = xb[keep], ids[keep]
            return exact_search(xb, ids, queries, k, self._packed_base(xb, len(queries), allowed))
        if allowed is not None and len(allowed) <= SUBSET_LIMIT:
            allowed = np.ascontiguousarray(allowed, dtype=np.int64)
            xb = self.cpu_index.reconstruct_batch(allowed)  # IDMap2 keeps id -> vector
            return exact_search(np.ascontiguousarray(xb), allowed, queries, k)
        params = _selector_params(self.cpu_index, allowed, k) if allowed is not None else None
        return _unpadded(*self._searcher.search(queries, k, params=params))

    def _packed_base(self, xb: np.ndarray, nq: int, allowed) -> packed.PackedBase | None:
        """``xb`` (this search's flat vectors) packed for batches, when the search uses them."""
        if allowed is not None or nq < TILED_MIN_QUERIES or len(xb) < PACK_MIN_VECTORS:
            return None
        base = self._packed
        if (base is None or base.n != len(xb)) and packed.available():
            # Concurrent first searches may both pack (same result, one kept); a copy packed
            # before an add or remove is never used for the vectors after it.
            base = self._packed = packed.PackedBase.pack(xb)
        return base

    def _search_live(self, queries: np.ndarray, k: int) -> list[Neighbors]:
        """Search around the tombstones: a selector on the CPU, over-fetching on a GPU."""
        k = min(int(k), self.ntotal - len(self._dead))
        if k <= 0:
            empty = Neighbors(np.zeros(0, np.int64), np.zeros(0, np.float32))
            return [empty] * len(queries)
        if self._searcher is self.cpu_index:
            dead = faiss.IDSelectorBatch(self._dead)  # kept referenced while the search runs
            sel = faiss.IDSelectorNot(dead)
            params = _selector_params(self.cpu_index, sel, k)
            scores, labels = self.cpu_index.search(queries, k, params=params)
        else:  # GPU indexes take no selectors: fetch enough that k live ones remain
            fetch = min(self.ntotal, k + len(self._dead))
            scores, labels = self._searcher.search(queries, fetch, params=None)
        out = []
        for lab, sc in zip(labels, scores, strict=True):
            keep = (lab >= 0) & ~np.isin(lab, self._dead)
            out.append(Neighbors(lab[keep][:k], sc[keep][:k]))
        return out


def _unpadded(scores: np.ndarray, labels: np.ndarray) -> list[Neighbors]:
    """Per-query results from FAISS's (Q, k) arrays, without the -1 padding FAISS adds when
    fewer than k are found."""
    keep = labels >= 0
    return [Neighbors(lab[m], sc[m]) for lab, sc, m in zip(labels, scores, keep, strict=True)]


def _selector_params(index: faiss.Index, allowed, k: int):
    """Search parameters restricted to ``allowed`` ids (an array, or a FAISS ID selector)."""
    if isinstance(allowed, faiss.IDSelector):
        sel = allowed
    else:
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=max(inner.hnsw.efSearch, k))
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return faiss.SearchParameters(sel=sel)
    return faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe)


def _default_search_params(index: faiss.Index) -> None:
    hnsw = getattr(faiss.downcast_index(index), "hnsw", None)
    if hnsw is not None:
        hnsw.efSearch = max(hnsw.efSearch, 128)
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return
    ivf.nprobe = max(1, min(ivf.nlist, int(ivf.nlist**0.5)))
