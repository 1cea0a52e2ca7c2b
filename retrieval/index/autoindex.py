"""Which index to build for a corpus and a memory budget, and how hard it must search.

In the spirit of autofaiss: exact search below `EXACT_LIMIT` vectors; above, an HNSW graph over
fp16 vectors (M as large as the budget allows), else an IVF with about 4 sqrt(N) lists over
fp16 vectors, else, when even that does not fit, IVF-PQ behind an OPQ rotation, whose
candidates the query layer re-ranks exactly from the stored fp16 vectors. Budgets count
FAISS's memory only, at the sizes FAISS allocates (codes, graph links, inverted-list ids, the
id maps).

Then `tune` raises the search knob (HNSW ``efSearch``, IVF ``nprobe``) until recall@10 against
exact search reaches the target on held-out queries from the other modality (captions for the
image index, images for the caption index: the queries users send, across the modality gap).
The knob and the recall it reached are recorded in the manifest and applied on every load.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..errors import IndexBuildError
from .config import TARGET_RECALL
from .exact import exact_search
from .manifest import INDEX_FILES, IndexEntry, Tuning
from .vector_index import EXACT_LIMIT, VectorIndex

log = logging.getLogger(__name__)

TUNING_QUERIES = 500
_ID_BYTES = 56  # IndexIDMap2: id list (8 B) + reverse hash map (~48 B per entry)
_HNSW_M = (32, 16, 8)
_PQ_M = (256, 128, 64, 48, 32, 24, 16, 12, 8, 4)
_EF = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True)
class Plan:
    factory: str
    bytes: int  # FAISS memory, estimated
    why: str


def bytes_per_vector(factory: str, d: int) -> float:
    """FAISS memory per vector of ``factory`` at dimension ``d`` (id maps included)."""
    code = 2 * d if factory.endswith(",SQfp16") else d if factory.endswith(",SQ8") else 4 * d
    if factory.startswith("HNSW"):
        m = int(factory[4:].split(",")[0] or 32)
        return code + 2 * m * 4 * 1.05 + _ID_BYTES  # level-0 links, ~5% upper levels
    if ",PQ" in factory:
        m, _, bits = factory.rsplit("PQ", 1)[1].partition("x")
        return int(m) * int(bits or 8) / 8 + 8 + _ID_BYTES
    if factory.startswith("IVF"):
        return code + 8 + _ID_BYTES
    return code + _ID_BYTES


def compressed(factory: str) -> bool:
    """Whether ``factory`` keeps approximations of the vectors rather than the vectors (fp16
    counts as the vectors: it is the precision the store keeps them in)."""
    if factory.endswith((",SQfp16", ",SQbf16")):
        return False
    return any(code in factory for code in ("PQ", "SQ", "LSH", "RaBitQ"))


def nlist_for(n: int) -> int:
    """About 4 sqrt(N) lists, a power of two, with >= 39 training points each (FAISS's floor)."""
    want = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return int(max(1, min(want, n // 39)))


def choose(n: int, d: int, max_memory: int | None = None) -> Plan:
    """The index for ``n`` vectors of dimension ``d`` within ``max_memory`` bytes (None: any)."""
    budget = math.inf if max_memory is None else max_memory
    nlist = nlist_for(n)
    options = []
    if n < EXACT_LIMIT:
        options.append(("Flat", f"exact: fewer than {EXACT_LIMIT:,} vectors"))
    # fp16 vectors: the precision the query layer re-scores from anyway, half the bytes of a
    # graph walk's every distance (1M x 128, efConstruction 200: 1.2x fp32's q/s, 584 B/vector
    # against 840; benchmarks/README.md, "ANN against its peers").
    graph = "graph search over fp16 vectors: fastest single queries"
    options += [(f"HNSW{m},SQfp16", graph) for m in _HNSW_M]
    options.append((f"IVF{nlist},SQfp16", "inverted lists over fp16 vectors: no graph memory"))
    options.append((f"IVF{nlist},SQ8", "inverted lists, 8 bits a dimension, re-ranked exactly"))
    # 8-bit codes (and OPQ's own training) need 256 training vectors; tiny corpora get 4-bit
    # codes without the rotation.
    rotate, bits = ("OPQ{m},", "") if n >= 256 else ("", "x4")
    options += [
        (
            f"{rotate.format(m=m)}IVF{nlist},PQ{m}{bits}",
            f"compressed to {m} codes a vector, re-ranked exactly",
        )
        for m in _PQ_M
        if d % m == 0
    ]
    for factory, why in options:
        need = int(n * bytes_per_vector(factory, d))
        if need <= budget:
            return Plan(factory, need, why)
    smallest = int(n * bytes_per_vector(options[-1][0], d))
    raise IndexBuildError(
        f"{n:,} vectors of dimension {d} need at least {human(smallest)} of index memory "
        f"({options[-1][0]}); the budget allows {human(budget)}"
    )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def training_sample(*parts: np.ndarray, limit: int = 100_000, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` rows drawn evenly from each part (image and caption vectors): coarse
    quantisers trained on both modalities serve queries from either."""
    rng = np.random.default_rng(seed)
    share = max(1, limit // max(1, len(parts)))
    rows = [p[rng.choice(len(p), min(share, len(p)), replace=False)] for p in parts if len(p)]
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)


def tune(
    index: VectorIndex,
    vectors: np.ndarray,
    queries: np.ndarray,
    target: float = TARGET_RECALL,
    seed: int = 0,
) -> Tuning | None:
    """Raise ``index``'s search knob until recall@10 >= ``target``; what it chose, or None.

    ``vectors`` (N, D) are the indexed vectors, row i under id i; ``queries`` (Q, D) held-out
    vectors, of which at most `TUNING_QUERIES` are used.
    """
    knob = index.knob()
    if knob is None or len(vectors) == 0 or len(queries) == 0:
        return None
    rng = np.random.default_rng(seed)
    q = queries[rng.choice(len(queries), min(TUNING_QUERIES, len(queries)), replace=False)]
    q = np.ascontiguousarray(q, dtype=np.float32)
    k = min(10, len(vectors))
    truth = [set(n.ids.tolist()) for n in exact_search(vectors, np.arange(len(vectors)), q, k)]
    recall = 0.0
    for value in _values(knob, index):
        index.set_knob(value)
        found = index.search(q, k)
        recall = float(
            np.mean([len(truth[i] & set(f.ids.tolist())) / k for i, f in enumerate(found)])
        )
        if recall >= target:
            break
    else:
        log.warning(
            "%s: recall@10 %.3f at %s=%d, short of %.2f", index.factory, recall, knob, value, target
        )
    return Tuning(knob, int(value), round(recall, 4), target, len(q))


def _values(knob: str, index: VectorIndex) -> list[int]:
    if knob == "efSearch":
        return list(_EF)
    nlist = index.nlist()
    values = [2**i for i in range(int(math.log2(nlist)) + 1)]
    return values if values[-1] == nlist else [*values, nlist]


def build_pair(
    images: np.ndarray,
    captions: np.ndarray,
    factory: str = "auto",
    max_memory: int | None = None,
    target: float = TARGET_RECALL,
    device: str = "cpu",
) -> tuple[dict[str, VectorIndex], dict[str, IndexEntry]]:
    """The image and caption indexes of a corpus, chosen, trained and tuned; rows are ids.

    Returns the indexes and, per kind, what the manifest records: factory, why, estimated
    memory, and the tuned search knob. ``max_memory`` is shared in proportion to the counts.
    """
    train = training_sample(images, captions)
    total = max(1, len(images) + len(captions))
    indexes, described = {}, {}
    for kind, x, other in (("image", images, captions), ("caption", captions, images)):
        share = None if max_memory is None else int(max_memory * len(x) / total)
        if len(x) == 0:
            plan = Plan("Flat", 0, "empty")
        elif factory == "auto":
            try:
                plan = choose(len(x), x.shape[1], share)
            except IndexBuildError as e:
                raise IndexBuildError(
                    f"the {kind} index: {e} (its share of --max-memory "
                    f"{human(max_memory)}, in proportion to the {kind} count)"
                ) from None
        else:
            plan = Plan(factory, int(len(x) * bytes_per_vector(factory, x.shape[1])), "asked for")
        index = VectorIndex.build(x, np.arange(len(x)), plan.factory, device, train=train)
        tuning = tune(index, x, other, target)
        described[kind] = IndexEntry(
            INDEX_FILES[kind], plan.factory, len(x), plan.why, plan.bytes, tuning
        )
        indexes[kind] = index
    return indexes, described


def apply(index: VectorIndex, entry: IndexEntry) -> VectorIndex:
    """Set the search knob a manifest entry recorded (nothing for exact indexes)."""
    if entry.search and index.knob() == entry.search.knob:
        index.set_knob(entry.search.value)
    return index
