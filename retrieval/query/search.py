"""The query path: encode the query, gather candidates, fuse, resolve them in LMDB.

A text query searches item images by default (text->image); an image query searches captions
(image->text) and returns the items whose caption matched, with that caption; a text and an
image together (a composed query) search images. ``target`` picks the other directions, and
``strategy`` how signals are fused (see `retrieval.query.ranking`).

Results follow one shape everywhere (Python, ``--json``, HTTP)::

    {"rank", "id", "score", "scores": {signal: value}, "path", "captions", "extra"
     [, "caption": {"id", "text"}]}
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..corpus import filters
from ..corpus.images import BadImage, load_image
from ..errors import DamagedIndexError, EncoderError, SearchError
from ..index import autoindex, integrity, layout
from ..index.embeddings import load_embeddings
from ..index.manifest import MANIFEST, read_manifest
from ..index.store import Store
from ..index.vector_index import VectorIndex
from ..model.encoder import Encoder
from ..model.runtime import FOLLOW_INDEX, RuntimeChoice
from ..model.spec import ModelSpec
from ..scoring.dedup import fold as fold_duplicates
from . import ranking
from . import rerank as rerank_module
from .cache import DEFAULT_CACHE_SIZE, EmbeddingCache
from .embed import TermEncoder
from .ranking import (
    DEFAULT_K,
    DEFAULT_MIX,
    DEFAULT_OVERFETCH,
)
from .terms import (
    ImageLike,
    PreparedImage,
    Query,
    QueryTerm,
    Request,
    check_numbers,
    resolve,
    term_kind,
)

log = logging.getLogger(__name__)


class Searcher:
    """An open index: FAISS indexes, the store and the model, loaded once, then queried."""

    def __init__(
        self,
        folder: Path,
        encoder: Encoder | None = None,
        device: str = "auto",
        link: Path | None = None,
        reranker: Path | None = None,
        cache: EmbeddingCache | None = None,
        runtime: RuntimeChoice = FOLLOW_INDEX,
    ) -> None:
        self.folder, self.link = folder, link  # link: the name's symlink, to follow updates
        self.manifest = read_manifest(folder)
        self.encoder = encoder or Encoder.load(
            self.manifest.model_spec(), device, runtime.over(self.manifest.runtime)
        )
        # Shared with the searchers of later versions (`latest`): same model, same vectors.
        self.cache = cache if cache is not None else EmbeddingCache()
        self.terms = TermEncoder(self.encoder, self.cache, self.manifest)
        self._allowed: dict[tuple, np.ndarray | str] = {}  # filter -> item rows, or the error
        # --rerank: the checkpoint holding the re-ranker (None: the index model's own), loaded
        # on first use.
        self.reranker_path, self._reranking = reranker, None
        if self.manifest.milvus is not None:  # everything lives in Milvus: nothing mapped here
            from ..index.milvus.backend import open_space
            from ..index.milvus.space import RowIndex

            self.space, self.store = open_space(self.manifest, layout.root_of(folder))
            self._close = weakref.finalize(self, self.store.close)
            self.images, self.captions = (
                RowIndex(self.space, "image"),
                RowIndex(self.space, "caption"),
            )
            return
        faiss_device = "cuda" if self.encoder.device.type == "cuda" else "cpu"
        # Memory-mapped: a published index is read-only, so pages load on demand, are shared
        # by every process serving it, and an index larger than RAM still serves.
        self.images, self.captions = (
            autoindex.apply(  # the search knob tuned at build time
                VectorIndex.load(folder / e.file, e.factory, faiss_device, mmap=True), e
            )
            for e in (self.manifest.indexes["image"], self.manifest.indexes["caption"])
        )
        self.store = Store.open(folder / layout.STORE)
        # A searcher replaced by `latest` is closed when its last request lets go of it.
        self._close = weakref.finalize(self, self.store.close)
        # Removed items that HNSW / IVF indexes still hold: never returned (until compact).
        self.images.exclude(self.store.tombstones("image"))
        self.captions.exclude(self.store.tombstones("caption"))
        self.space = ranking.SearchSpace.of(
            self.images, self.captions, load_embeddings(folder), self.manifest.querybank.beta
        )

    @classmethod
    def open(
        cls,
        name: str,
        index_dir: str | Path | None = None,
        model: ModelSpec | None = None,
        device: str = "auto",
        encoder: Encoder | None = None,
        reranker: Path | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        runtime: RuntimeChoice = FOLLOW_INDEX,
    ) -> Searcher:
        """Open index ``name``; ``model``, when given, must be the one the index was built with.

        ``model`` with an empty name: the index's own model, weights from ``model.pretrained``
        (its checkpoint moved: the sha256 must match). ``reranker``: a checkpoint whose
        re-ranker ``--rerank`` uses (default: the one saved with the index's model); its dual
        encoder must be the index's. ``cache_size``: query embeddings kept (0: none).
        ``runtime``: what runs the model (left out: the runtime the index was built with).
        """
        link = layout.index_root(index_dir) / name
        for attempt in range(3):
            folder = integrity.resolve(name, index_dir)
            try:
                manifest = read_manifest(folder)
            except FileNotFoundError:  # pruned between resolve and read: resolve again
                if attempt < 2:
                    continue
                raise
            problems = integrity.size_problems(folder, manifest)
            if problems:
                if attempt < 2 and folder != layout.resolve(name, index_dir):
                    continue  # pruned while we looked: the name points elsewhere now
                raise integrity.damaged(name, folder, problems[0])
            if encoder is None and model is not None:
                chosen = runtime.over(manifest.runtime)
                encoder = Encoder.load(manifest.spec_for(model), device, chosen)
            try:
                cache = EmbeddingCache(cache_size)
                return cls(folder, encoder, device, link, reranker, cache, runtime)
            except EncoderError:
                raise
            except (FileNotFoundError, RuntimeError) as e:
                # Two writers' publications in a row prune the version we had just resolved,
                # maybe while we read it: then open the one the name points to now.
                moved = not folder.exists() or layout.resolve(name, index_dir) != folder
                if attempt < 2 and moved:
                    continue
                raise integrity.unopenable(name, e) from None
        raise AssertionError("unreachable")

    def latest(self) -> Searcher:
        """This searcher, or one on the version published since it opened (same model)."""
        if self.link is None:
            return self
        try:
            folder = self.link.resolve(strict=True)
        except OSError:
            return self
        if folder == self.folder or not (folder / MANIFEST).is_file():
            return self
        try:
            problems = integrity.size_problems(folder, read_manifest(folder))
        except (DamagedIndexError, OSError) as e:  # unreadable, or pruned since: next time
            problems = [str(e)]
        if problems:  # keep serving the version that is whole
            log.warning("index %s: the new version is damaged (%s)", self.link.name, problems[0])
            return self
        try:
            newer = Searcher(
                folder, self.encoder, link=self.link, reranker=self.reranker_path, cache=self.cache
            )
        except (FileNotFoundError, RuntimeError):  # already replaced again: next time
            return self
        log.info("index %s: switched to the newly published version %s", self.link.name, folder)
        if newer.manifest.runtime != self.manifest.runtime:
            why = "index %s was rebuilt with %s; queries keep %s until a restart"
            log.warning(why, self.link.name, newer.manifest.runtime, self.encoder.runtime)
        return newer

    def close(self) -> None:
        self._close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        described = self.manifest.to_json()
        return {**described, "folder": str(self.folder), "store": self.store.counts()}

    def embed(self, term: QueryTerm) -> np.ndarray:
        """The term's (1, D) unit vector."""
        return self.terms.embed(term)

    def prepare(self, image: ImageLike) -> PreparedImage:
        """``image`` decoded, made the model's input and hashed, ready for a query: a server
        prepares uploads in its request threads, away from the thread that encodes."""
        return self.terms.prepare(image)

    def search(
        self,
        query: Query,
        k: int = DEFAULT_K,
        target: str | None = None,
        strategy: str | None = None,
        where: tuple[str, ...] = (),
        overfetch: int = DEFAULT_OVERFETCH,
        mix: float = DEFAULT_MIX,
        dedup: float | None = None,
        rerank: int | None = None,
    ) -> dict[str, Any]:
        """``{"query", "target", "strategy", "where", "results"}`` with the ``k`` best items.

        ``dedup``: a cosine similarity; an item whose image is at least that close to a better
        ranked result's is folded into it (listed in its ``"duplicates"``), and k distinct
        results still come back when the index has them. ``rerank``: the re-ranker re-orders
        the strategy's top ``rerank`` (`retrieval.query.rerank`; ``itm`` in the scores).
        """
        request = Request(query, k, target, strategy, tuple(where), overfetch, mix, dedup, rerank)
        return self.search_many([request])[0]

    def search_many(
        self, requests: Sequence[Request], return_exceptions: bool = False
    ) -> list[dict[str, Any] | SearchError | EncoderError]:
        """Each request's answer, as `search` gives it, for a batch answered together: its
        texts and its images encoded in one forward pass each (cache misses only), its
        candidates fetched in one batched search per (side, fetch, filter). A re-ranked
        request encodes its own query (its tokens too) and a ``dedup`` one searches on its own.

        ``return_exceptions``: a request's one-line error (SearchError, EncoderError) takes
        its place in the list and the others are answered; otherwise the first is raised.
        """
        pending = [_Pending(r) for r in requests]
        for p in pending:
            p.attempt(self._check, p)
        self._embed(pending)
        try:
            if self.manifest.milvus is not None:  # the version and state this batch sees
                self.space.refresh()
            for p in pending:
                p.attempt(self._allow, p)
            self._rank(pending)
        except SearchError as e:  # the backend failed: every request still under way fails
            for p in pending:
                p.error = p.error or e
        for p in pending:
            p.attempt(self._finish, p)
        out = [p.error or p.answer for p in pending]
        if not return_exceptions:
            for answer in out:
                if isinstance(answer, Exception):
                    raise answer
        return out

    def _check(self, p: _Pending) -> None:
        """The request's terms, target, strategy and re-ranking, each checked."""
        r = p.request
        p.terms = r.query.all_terms()
        if not p.terms:
            raise SearchError("the query is empty: give a text, an image or both")
        check_numbers(r.k, r.overfetch, r.mix)
        if r.dedup is not None and not 0 < r.dedup <= 1:
            raise SearchError(f"dedup must be a cosine similarity in (0, 1], not {r.dedup}")
        p.target, p.strategy = resolve(p.terms, r.target, r.strategy)
        if r.rerank is not None:
            p.pairing = rerank_module.check(r.rerank, p.terms, p.target)

    def _allow(self, p: _Pending) -> None:
        p.allowed = self._filter(tuple(p.request.where))  # a list from Python callers too

    def _embed(self, pending: list[_Pending]) -> None:
        """Every term's vector: one batch for the plain requests, a pass of its own (with the
        re-ranker's tokens) for each re-ranked one."""
        plain = [p for p in pending if p.error is None and p.pairing is None]
        flat = [t for p in plain for t in p.terms]
        vectors = iter(self.terms.embed_many(flat))
        for p in plain:
            mine = [next(vectors) for _ in p.terms]
            bad = next((v for v in mine if isinstance(v, Exception)), None)
            if bad is not None:
                p.error = bad
                continue
            p.vectors = [
                ranking.Term(term_kind(t), v, t.weight) for t, v in zip(p.terms, mine, strict=True)
            ]
        for p in pending:
            if p.error is None and p.pairing is not None:
                p.attempt(self._embed_reranked, p)

    def _embed_reranked(self, p: _Pending) -> None:
        vec, *p.reused = self.terms.tokens(p.terms[0])
        p.vectors = [ranking.Term(term_kind(p.terms[0]), vec, p.terms[0].weight)]

    def _rank(self, pending: list[_Pending]) -> None:
        """Each request's hits; the plain ones as one batch (`ranking.run_many`)."""
        ready = [p for p in pending if p.error is None]
        for p in ready:
            r = p.request
            p.options = ranking.Options(
                max(r.k, r.rerank or 0), p.target, p.strategy, r.overfetch, r.mix
            )
        batch = [p for p in ready if p.request.dedup is None]
        jobs = [ranking.Job(p.vectors, p.options, p.allowed) for p in batch]
        for p, hits in zip(batch, ranking.run_many(self.space, jobs), strict=True):
            if isinstance(hits, SearchError):
                p.error = hits
            else:
                p.kept = [(hit, []) for hit in hits]
        for p in ready:
            if p.request.dedup is not None:
                p.attempt(self._ranked_distinct, p)

    def _ranked_distinct(self, p: _Pending) -> None:
        p.kept = self._distinct(p.vectors, p.options, p.allowed, p.request.dedup)

    def _finish(self, p: _Pending) -> None:
        """Re-rank when asked, then the answer with the results resolved in the store."""
        r = p.request
        if p.pairing is not None:
            p.kept = self._reranked(p.pairing, p.reused, p.kept, r.rerank)
        p.answer = {
            "query": r.query.describe(),
            "target": p.target,
            "strategy": p.strategy,
            "where": list(r.where),
            "results": self._results(p.kept[: r.k], r.dedup is not None),
        }

    def _results(self, kept: list, folding: bool) -> list[dict[str, Any]]:
        """The result dicts of ``kept`` (hit, folded hits), in order."""
        if self.manifest.milvus is not None:  # one query for every result, not two per result
            rows = [h.item for h, folded in kept for h in (h, *folded)]
            self.store.prefetch(rows, [h.caption for h, _ in kept if h.caption is not None])
        results = []
        for rank, (hit, folded) in enumerate(kept, 1):
            result = self._result(rank, hit)
            if folding:
                result["duplicates"] = self.store.item_ids([h.item for h in folded])
            results.append(result)
        return results

    def _reranked(self, pairing: str, query: list, kept: list, n: int) -> list:
        """``kept`` (hit, folded) with its first ``n`` re-ordered by the re-ranker; ``query``:
        the query text's states and mask, or the query image's patches."""
        head, folded = [h for h, _ in kept[:n]], {h.item: f for h, f in kept[:n]}
        if not head:
            return kept
        if self.manifest.milvus is not None:  # this query's snapshot: its rows, read at once
            self.store.prefetch([h.item for h in head], [h.caption for h in head if h.caption])
        if pairing == "text":
            head = self.reranking().text_against_images(query, head)
        else:
            texts = [
                (self.store.caption(self.store.caption_ids([h.caption])[0]) or {}).get("text", "")
                for h in head
            ]
            head = self.reranking().image_against_captions(query[0], head, texts)
        return [(h, folded[h.item]) for h in head] + kept[n:]

    def reranking(self) -> rerank_module.Reranking:
        """The re-ranker and the index's stored patch tokens, loaded once; the same one-line
        error each time when there is none (`retrieval.query.rerank.load`)."""
        if isinstance(self._reranking, str):  # a fresh error each time: no growing traceback
            raise SearchError(self._reranking)
        if self._reranking is None:
            try:
                self._reranking = rerank_module.load(
                    self.folder, self.encoder, self.reranker_path, self._row_image
                )
            except (SearchError, EncoderError) as e:
                self._reranking = str(e)
                raise
        return self._reranking

    def can_rerank(self) -> bool:
        """Whether ``rerank`` works on this index (its model, or ``--reranker``, has one)."""
        try:
            self.reranking()
        except (SearchError, EncoderError):
            return False
        return True

    def _row_image(self, row: int) -> Image.Image:
        """The image of item ``row``, decoded again from its file (re-ranking without stored
        patch tokens)."""
        item = self.store.item(self.store.item_ids([row])[0]) or {}
        try:
            return load_image(item.get("path"))
        except (BadImage, TypeError) as e:
            raise SearchError(
                f"cannot re-rank: the image of item {item.get('id', row)} is unreadable ({e})"
            ) from None

    def _distinct(self, vectors, options: ranking.Options, allowed, threshold: float):
        """The ``options.k`` best hits that are no near-copy of a better one, each with the hits
        folded into it; fetches 4x more until k are distinct or the candidates run out."""
        fetch = options.k * 4
        while True:
            hits = ranking.run(self.space, vectors, replace(options, k=fetch), allowed)
            rows = np.array([h.item for h in hits], dtype=np.int64)
            images = self.space.images_of(rows)[0]
            images /= np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
            owner = fold_duplicates(images, threshold)
            kept = np.flatnonzero(owner == np.arange(len(hits)))
            if len(kept) >= options.k or len(hits) < fetch:
                break
            fetch *= 4
        return [
            (hits[i], [hits[j] for j in np.flatnonzero((owner == i) & (np.arange(len(hits)) != i))])
            for i in kept[: options.k]
        ]

    def _filter(self, where: tuple[str, ...]) -> np.ndarray | None:
        """Sorted item rows passing every condition (None: no filter), computed once each."""
        if not where:
            return None
        if self.manifest.milvus is not None:  # pushed down to Milvus as an expression
            return self.space.allowed(tuple(filters.parse(w) for w in where))
        if where not in self._allowed:
            conds = tuple(filters.parse(w) for w in where)
            rows, fields = [], set()
            for it in self.store.iter_items():
                fields.update(it.get("extra", {}))
                if filters.matches_all(conds, it.get("extra", {})):
                    rows.append(it["row"])
            # An unknown field's message is remembered too: a client repeating it must not
            # rescan the store.
            msg = filters.unknown_field([c.key for c in conds], fields)
            self._allowed[where] = msg or np.array(sorted(rows), dtype=np.int64)
        if isinstance(allowed := self._allowed[where], str):
            raise SearchError(allowed)
        return allowed

    def _result(self, rank: int, hit: ranking.Hit) -> dict[str, Any]:
        item_id = self.store.item_ids([hit.item])[0]
        item = self.store.item(item_id) or {}
        out = {
            "rank": rank,
            "id": item_id,
            "score": round(hit.score, 6),
            "scores": hit.scores,
            "path": item.get("path"),
            "captions": [c["text"] for c in item.get("captions", [])],
            "extra": item.get("extra", {}),
        }
        if hit.caption is not None and hit.caption >= 0:
            cap = self.store.caption(self.store.caption_ids([hit.caption])[0]) or {}
            out["caption"] = {"id": cap.get("id"), "text": cap.get("text")}
        return out


class _Pending:
    """One request on its way through `Searcher.search_many`: what each stage made of it, or
    the one-line error that ended it."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.error: SearchError | EncoderError | None = None
        self.terms: tuple[QueryTerm, ...] = ()
        self.target = self.strategy = ""
        self.pairing: str | None = None  # re-ranked: "text" or "image"
        self.vectors: list[ranking.Term] = []
        self.reused: list = []  # the re-ranker's query tokens
        self.allowed: Any = None
        self.options: ranking.Options | None = None
        self.kept: list = []  # (hit, hits folded into it)
        self.answer: dict[str, Any] | None = None

    def attempt(self, stage, *args) -> None:
        """Run ``stage`` unless the request has failed already; its error ends the request."""
        if self.error is not None:
            return
        try:
            stage(*args)
        except (SearchError, EncoderError) as e:
            self.error = e


def search(
    name: str,
    query: Query,
    index_dir: str | Path | None = None,
    model: ModelSpec | None = None,
    device: str = "auto",
    reranker: Path | None = None,
    runtime: RuntimeChoice = FOLLOW_INDEX,
    **options: Any,
) -> dict[str, Any]:
    """One-shot search: open index ``name``, run one query (see `Searcher.search`), close it."""
    opened = Searcher.open(
        name, index_dir, model=model, device=device, reranker=reranker, runtime=runtime
    )
    with opened as s:
        return s.search(query, **options)
