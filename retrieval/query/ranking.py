"""The query layer: weighted query terms -> candidates -> exact re-score -> one fused ranking.

Signals are named ``<query><candidate>`` with ``t`` for text and ``i`` for image: ``t2i``
scores an item by its image against a text query, ``t2t`` by its best caption, and so on.
Each signal fetches ``overfetch * k`` candidates from its FAISS index; the union is re-scored
exactly from the stored (fp16) embeddings, then fused by the strategy:

- ``cosine``: the target's signal, plain cosine similarity;
- ``qbnorm``: the same, corrected by querybank normalisation (hub candidates demoted);
- ``hybrid``: the target's signal and the other modality's, min-max normalised and summed with
  weights ``1 - mix`` and ``mix``; ``hybrid-rrf``: the two fused by reciprocal-rank fusion;
- ``arith``: composed queries only: one embedding, the weighted sum of the terms' embeddings.

Several terms (a text and an image, negative terms) are fused at score level over the union of
their candidates: ``sum_t weight_t * score_t``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import SearchError
from ..scoring import fusion

if TYPE_CHECKING:  # the CLI imports STRATEGIES; it must not pay for FAISS and torch
    from ..index.embeddings import Embeddings
    from ..index.vector_index import VectorIndex

STRATEGIES = ("cosine", "qbnorm", "hybrid", "hybrid-rrf", "arith")
DEFAULT_STRATEGY = "cosine"  # in every direction, by measurement (benchmarks/README.md)
DEFAULT_MIX = 0.2  # hybrid: the other modality's weight (best on coco-mini, benchmarks/README.md)
DEFAULT_OVERFETCH = 10
DEFAULT_K = 10
DEFAULT_IMAGE_WEIGHT = 0.5  # a text and an image together: the image's weight
# --dedup without a value: the lowest cosine above every pair of distinct coco-mini photos
# under effnet-minilm; folds 85-99% of re-saves, resizes and crops (benchmarks/README.md).
DEFAULT_DEDUP = 0.85
MAX_RERANK = 1000  # --rerank: candidates one query may re-score, each a pass through the re-ranker


@dataclass(frozen=True)
class Options:
    k: int = DEFAULT_K
    target: str = "images"  # "images" or "captions"
    strategy: str = DEFAULT_STRATEGY
    overfetch: int = DEFAULT_OVERFETCH  # candidates per signal: overfetch * k
    mix: float = DEFAULT_MIX  # hybrid: weight of the other modality's signal


class Space(Protocol):
    """What queries are scored against: one index version, whatever its backend. Rows are the
    backend's int64 item and caption numbers; ``allowed`` is what the backend made of a
    filter (None: everything)."""

    beta: float  # querybank temperature

    def nearest_items(self, vecs: np.ndarray, fetch: int, allowed: Any) -> list[np.ndarray]:
        """Per query of ``vecs`` (Q, D): item rows of the ``fetch`` images nearest to it, in
        one batched search."""
        ...

    def nearest_captions(self, vecs: np.ndarray, fetch: int, allowed: Any) -> list[np.ndarray]:
        """Per query of ``vecs`` (Q, D): item rows owning the ``fetch`` captions nearest to
        it, repeats kept, in one batched search."""
        ...

    def caption_count(self, allowed: Any) -> int: ...

    def images_of(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(U, D) float32 stored vectors of ``items`` (U,) and their (U,) normalisers."""
        ...

    def captions_of(self, items: np.ndarray) -> tuple[np.ndarray, ...]:
        """Caption rows (C,) of ``items``, the position in ``items`` each belongs to (C,), their
        (C, D) float32 stored vectors and (C,) normalisers."""
        ...


@dataclass
class SearchSpace:
    """The FAISS backend's `Space`: both FAISS indexes, the stored embeddings (N, D) fp16
    and the querybank normalisers of one index version; rows are FAISS ids."""

    images: VectorIndex
    captions: VectorIndex
    image_emb: np.ndarray
    caption_emb: np.ndarray
    caption_owner: np.ndarray  # (C,) item row of each caption row
    image_norm: np.ndarray  # (I,) querybank normalisers (text->image)
    caption_norm: np.ndarray  # (C,) querybank normalisers (image->text)
    beta: float
    _order: np.ndarray = field(init=False, repr=False)
    _starts: np.ndarray = field(init=False, repr=False)

    @classmethod
    def of(cls, images: VectorIndex, captions: VectorIndex, emb: Embeddings, beta: float):
        """The space of one index version: its indexes and its ``embeddings/`` folder."""
        return cls(
            images, captions, emb.image, emb.caption, emb.caption_owner,
            emb.image_norm, emb.caption_norm, beta,
        )  # fmt: skip

    def __post_init__(self) -> None:
        self._order = np.argsort(self.caption_owner, kind="stable")  # caption rows by item
        bounds = np.searchsorted(
            self.caption_owner[self._order], np.arange(len(self.image_emb) + 1)
        )
        self._starts = bounds

    def nearest_items(self, vecs: np.ndarray, fetch: int, allowed: Any) -> list[np.ndarray]:
        return [nb.ids for nb in self.images.search(vecs, fetch, allowed=allowed)]

    def nearest_captions(self, vecs: np.ndarray, fetch: int, allowed: Any) -> list[np.ndarray]:
        found = self.captions.search(vecs, fetch, allowed=self._allowed_captions(allowed))
        return [self.caption_owner[nb.ids] for nb in found]

    def caption_count(self, allowed: Any) -> int:
        caps = self._allowed_captions(allowed)
        return self.captions.ntotal if caps is None else len(caps)

    def _allowed_captions(self, allowed: np.ndarray | None) -> np.ndarray | None:
        return None if allowed is None else np.flatnonzero(np.isin(self.caption_owner, allowed))

    def images_of(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.image_emb[items].astype(np.float32), self.image_norm[items]

    def captions_of(self, items: np.ndarray) -> tuple[np.ndarray, ...]:
        lo, hi = self._starts[items], self._starts[items + 1]
        counts = hi - lo
        pos = np.repeat(np.arange(len(items)), counts)
        within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = self._order[np.repeat(lo, counts) + within]
        return rows, pos, self.caption_emb[rows].astype(np.float32), self.caption_norm[rows]


@dataclass(frozen=True, eq=False)  # compared by identity: it holds an array
class Term:
    """One query vector (1, D) with its weight; ``kind`` is "t" (text), "i" (image) or "v" (a
    vector computed elsewhere): the first letter of its signals' names."""

    kind: str
    vector: np.ndarray
    weight: float = 1.0


@dataclass
class Hit:
    item: int  # item row
    score: float
    scores: dict[str, float]
    caption: int | None  # best caption row, when captions were the target


def _signals(kind: str, options: Options) -> list[tuple[str, float]]:
    own = "i" if options.target == "images" else "t"
    other = "t" if own == "i" else "i"
    if options.strategy in ("hybrid", "hybrid-rrf"):
        return [(f"{kind}2{own}", 1 - options.mix), (f"{kind}2{other}", options.mix)]
    return [(f"{kind}2{own}", 1.0)]


@dataclass(frozen=True, eq=False)
class Job:
    """One query of a batch: its terms, options and filter (``allowed``, as the `Space`
    takes it: the same object for requests with the same filter)."""

    terms: list[Term]
    options: Options
    allowed: Any = None


@dataclass(frozen=True, eq=False)
class _Plan:
    """A job's signals to fetch candidates for, each (term, signal name, weight)."""

    job: Job
    terms: list[Term]
    signals: list[tuple[Term, str, float]]
    k: int
    fetch: int


def rescore(space: Space, vec: np.ndarray, side: str, items: np.ndarray, qbnorm: bool):
    """Exact scores of ``items`` (U,): (U,) values (NaN: no caption) and best caption rows."""
    v = vec[0].astype(np.float32)
    if side == "i":
        vectors, norms = space.images_of(items)
        s = vectors @ v
        if qbnorm:
            s = fusion.querybank_scores(s, norms, space.beta)
        return s.astype(np.float64), None
    rows, pos, vectors, norms = space.captions_of(items)
    s = (vectors @ v).astype(np.float64)
    if qbnorm:
        s = fusion.querybank_scores(s, norms, space.beta)
    best = np.full(len(items), np.nan)
    best_row = np.full(len(items), -1, dtype=np.int64)
    order = np.lexsort((-s, pos))  # per item, best caption first
    first = np.ones(len(order), dtype=bool)
    first[1:] = pos[order][1:] != pos[order][:-1]
    best[pos[order][first]] = s[order][first]
    best_row[pos[order][first]] = rows[order][first]
    return best, best_row


def run(space: Space, terms: list[Term], options: Options, allowed: Any = None) -> list[Hit]:
    """The ``options.k`` best items for ``terms`` under ``options.strategy``."""
    (out,) = run_many(space, [Job(terms, options, allowed)])
    if isinstance(out, SearchError):
        raise out
    return out


def run_many(space: Space, jobs: list[Job]) -> list[list[Hit] | SearchError]:
    """Each job's hits, as `run` gives them, or its one-line error. Candidates come from one
    batched search per (side, fetch, filter) across the jobs, whose failure is the error of
    the jobs in it only; the rest is per job."""
    plans: list[_Plan | SearchError] = []
    for job in jobs:
        try:
            plans.append(_plan(job))
        except SearchError as e:
            plans.append(e)
    pools = _gather(space, [p for p in plans if isinstance(p, _Plan)])
    out: list[list[Hit] | SearchError] = []
    for plan in plans:
        if isinstance(plan, SearchError):
            out.append(plan)
            continue
        pool = [pools[id(plan), n] for n in range(len(plan.signals))]
        failed = next((rows for rows in pool if isinstance(rows, SearchError)), None)
        if failed is not None:
            out.append(failed)
            continue
        try:
            out.append(_ranked(space, plan, pool))
        except SearchError as e:
            out.append(e)
    return out


def _plan(job: Job) -> _Plan:
    options, terms = job.options, job.terms
    if options.strategy not in STRATEGIES:
        raise SearchError(
            f"unknown strategy {options.strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    if options.strategy == "arith":
        terms = [_arithmetic(terms)]
    k, fetch = options.k, max(options.k, options.overfetch * options.k)
    if options.strategy == "cosine" and len(terms) == 1:
        fetch = k  # nothing to fuse: the index's own top k are the answer
    signals = [(t, name, w) for t in terms for name, w in _signals(t.kind, options)]
    return _Plan(job, terms, signals, k, fetch)


def _gather(space: Space, plans: list[_Plan]) -> dict[tuple[int, int], Any]:
    """Candidate item rows per (plan, signal), or the SearchError of their search: the signals
    that search the same side with the same fetch and filter go to the backend as one batch."""
    groups: dict[tuple, list[tuple[_Plan, int]]] = {}
    for plan in plans:
        for n, (_, name, _) in enumerate(plan.signals):
            allowed = plan.job.allowed
            same = allowed if allowed is None or isinstance(allowed, str) else id(allowed)
            groups.setdefault((name[-1], plan.fetch, same), []).append((plan, n))
    pools = {}
    for (side, fetch, _), members in groups.items():
        allowed = members[0][0].job.allowed
        vecs = np.concatenate([plan.signals[n][0].vector for plan, n in members])
        nearest = space.nearest_items if side == "i" else space.nearest_captions
        try:
            found = nearest(vecs, fetch, allowed)
        except SearchError as e:  # this group's requests fail, and only they
            found = [e] * len(members)
        for (plan, n), rows in zip(members, found, strict=True):
            if side == "t" and not isinstance(rows, SearchError):
                rows = _distinct_items(space, plan, n, rows, (fetch, allowed))
            pools[id(plan), n] = rows
    return pools


def _distinct_items(space: Space, plan: _Plan, n: int, rows: np.ndarray, search) -> np.ndarray:
    """Several captions of one item collapse into one candidate: fetch 4x more while fewer
    than k items came back (``search``: the batch's fetch and filter); a failure of those
    searches is the result."""
    (fetch, allowed), rows = search, np.unique(rows)
    total, vec = space.caption_count(allowed), plan.signals[n][0].vector
    try:
        while len(rows) < plan.k and fetch < total:
            fetch *= 4
            rows = np.unique(space.nearest_captions(vec, fetch, allowed)[0])
    except SearchError as e:
        return e
    return rows


def _ranked(space: Space, plan: _Plan, pool: list[np.ndarray]) -> list[Hit]:
    """The plan's top k over the union of its candidates, re-scored exactly and fused."""
    options, terms = plan.job.options, plan.terms
    items = np.unique(np.concatenate(pool)) if pool else np.zeros(0, np.int64)
    values, best_caption = {}, None
    for n, (t, name, _) in enumerate(plan.signals):
        key = name if len(terms) == 1 else f"{name}[{terms.index(t)}]"
        values[key], rows = rescore(space, t.vector, name[-1], items, options.strategy == "qbnorm")
        if n == 0 and rows is not None:
            best_caption = rows
    total = _fuse(plan.signals, values, options, terms)
    keep = np.flatnonzero(~np.isnan(total))
    top = keep[fusion.top_k(total[keep], plan.k)]
    return [
        Hit(
            int(items[j]),
            float(total[j]),
            {s: round(float(v[j]), 6) for s, v in values.items() if not np.isnan(v[j])},
            int(best_caption[j]) if best_caption is not None else None,
        )
        for j in top
    ]


def _arithmetic(terms: list[Term]) -> Term:
    vec = sum(t.weight * t.vector for t in terms)
    norm = np.linalg.norm(vec)
    if norm < 1e-12:
        raise SearchError("the weighted terms cancel out: no direction left to search")
    kinds = {t.kind for t in terms}
    return Term(kinds.pop() if len(kinds) == 1 else "q", (vec / norm).astype(np.float32))


def _fuse(plan, values: dict[str, np.ndarray], options: Options, terms) -> np.ndarray:
    """One score per item: each term's signals fused by the strategy, then weighted by term."""
    keys = list(values)
    if options.strategy == "hybrid-rrf":  # ranks fused over every (term, signal) at once
        weights = {key: t.weight * w for key, (t, _, w) in zip(keys, plan, strict=True)}
        return fusion.fuse_signals(values, weights, rrf=True)
    total = None
    for t in terms:
        mine = {key: w for key, (tt, _, w) in zip(keys, plan, strict=True) if tt is t}
        if options.strategy == "hybrid":
            part = fusion.fuse_signals({key: values[key] for key in mine}, mine)
        else:  # one signal: its plain scores
            part = values[next(iter(mine))]
        total = t.weight * part if total is None else total + t.weight * part
    return total
