"""`retrieval bench`: Recall@K of a model or of a built index, with CLIP_benchmark's definitions.

Every strategy is one row: ``exact`` (brute force over the embeddings) and each approximate
index, so users see what an index costs in recall; query-layer strategies join as rows too.
Metric keys follow CLIP_benchmark (``image_retrieval_recall@5`` = text->image,
``text_retrieval_recall@5`` = image->text); see `retrieval.scoring.metrics` for ranks and ties.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..corpus.filters import check_field, group_codes
from ..corpus.readers import read_corpus
from ..corpus.records import unique_records
from ..errors import RetrievalError
from ..index import querybank
from ..index.vector_index import VectorIndex
from ..model import reranker as reranker_module
from ..model.encoder import Encoder
from ..model.runtime import ALL_RUNTIMES, TORCH_FP32, Runtime, RuntimeChoice
from ..model.spec import ModelSpec
from ..query.search import Query, Request, Searcher
from ..scoring import metrics
from . import rerank, strategies
from .config import BenchConfig

log = logging.getLogger(__name__)

QUERY_BATCH = 256  # queries per `search_many` call of the built-index row

DIRECTIONS = {"image_retrieval": "text->image", "text_retrieval": "image->text"}


@dataclass
class Embedded:
    """What is scored: ``image`` (I, D), ``text`` (T, D), ``text_to_image`` (T,) positions."""

    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray
    item_ids: list[str]
    groups: np.ndarray | None = None
    paths: list[Path] = field(default_factory=list)  # each image's file (re-ranking)
    texts: list[str] = field(default_factory=list)  # each caption (re-ranking)
    patches: np.ndarray | None = None  # (I, P, W) fp16, when the images were encoded with them


@dataclass
class Row:
    strategy: str
    metrics: dict[str, float]
    curves: dict[str, np.ndarray]  # direction key -> recall@1..max_k


@dataclass
class BenchResult:
    dataset: str
    model: ModelSpec  # the model that encoded the dataset (an index's own, for --index)
    runtime: Runtime  # what ran it (`exact [runtime]` rows: their own)
    rows: list[Row]  # exact first, then the built index, approximate indexes, strategies
    images: int
    captions: int
    skipped: int

    def row(self, strategy: str) -> Row:
        return next(r for r in self.rows if r.strategy == strategy)


def load_dataset(path: Path, config: BenchConfig) -> tuple[list, list]:
    records, skipped = unique_records(read_corpus(path, config.read))
    records = [r for r in records if any(r.captions)]
    if not records:
        split = f" in split {config.read.split!r}" if config.read.split else ""
        raise RetrievalError(f"{path}: no item with a caption to evaluate{split}")
    if config.group_key:
        check_field(records, config.group_key)
    return records, skipped


def embed_with_model(records, config: BenchConfig) -> tuple[Embedded, Encoder]:
    encoder = Encoder.load(config.model or ModelSpec(), config.device, config.runtime.over())
    pieces: list[np.ndarray] | None = [] if config.rerank else None  # the re-ranker's input too
    img, pos, failures = encoder.encode_image_files(
        [r.image for r in records],
        config.batch_size,
        config.workers,
        progress=config.progress,
        patches=pieces,
    )
    if failures:
        log.warning("%d images could not be decoded and are left out", len(failures))
    kept = [records[p] for p in pos]
    emb = _with_captions(kept, img, encoder, config)
    emb.patches = np.concatenate(pieces) if pieces else None
    return emb, encoder


def _with_captions(kept, img: np.ndarray, encoder: Encoder, config: BenchConfig) -> Embedded:
    texts = [c for r in kept for c in r.captions if c]
    owner = np.array([i for i, r in enumerate(kept) for c in r.captions if c], dtype=np.int64)
    text = encoder.encode_texts(texts, progress=config.progress)
    groups = group_codes(kept, config.group_key) if config.group_key else None
    paths = [r.image for r in kept]
    return Embedded(img, text, owner, [r.id for r in kept], groups, paths, texts)


def embed_from_index(records, searcher: Searcher, config: BenchConfig) -> Embedded:
    """Images: the index's stored vectors; captions: the dataset's, encoded by its model."""
    kept, rows = [], []
    for r in records:
        item = searcher.store.item(r.id)
        if item is not None:
            kept.append(r)
            rows.append(item["row"])
    if not kept:
        raise RetrievalError("none of the dataset's ids is in the index; build it from the dataset")
    if len(kept) < len(records):
        log.warning("%d dataset items are not in the index", len(records) - len(kept))
    img = searcher.space.images_of(np.array(rows, dtype=np.int64))[0]  # any backend
    img /= np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    return _with_captions(kept, img, searcher.encoder, config)


def exact_row(emb: Embedded, ks, max_k: int) -> Row:
    t2i, i2t = metrics.retrieval_ranks(emb.image, emb.text, emb.text_to_image)
    m = metrics.retrieval_metrics(emb.image, emb.text, emb.text_to_image, ks)
    curves = {
        "image_retrieval": metrics.recall_curve(t2i, max_k),
        "text_retrieval": metrics.recall_curve(i2t, max_k),
    }
    return Row("exact", m, curves)


def grouped_row(emb: Embedded, ks, max_k: int, key: str) -> Row:
    ranks = metrics.grouped_text_to_image_ranks(
        emb.image, emb.text, emb.groups, emb.groups[emb.text_to_image]
    )
    m = {f"image_retrieval_recall@{k}": v for k, v in metrics.recall_at_k(ranks, ks).items()}
    return Row(
        f"exact, any image of the same {key}",
        m,
        {"image_retrieval": metrics.recall_curve(ranks, max_k)},
    )


def _rows_from_hits(name: str, t2i_hits, i2t_hits, emb: Embedded, ks, max_k: int) -> Row:
    """``t2i_hits``: (T, L) image positions and their scores; ``i2t_hits``: (I, L) caption
    positions and scores; position -1: no result, -2: not in the dataset (a distractor)."""
    (t2i_pos, t2i_scores), (i2t_pos, i2t_scores) = t2i_hits, i2t_hits
    t2i = metrics.listed_ranks(t2i_pos == emb.text_to_image[:, None], t2i_scores)
    owner = np.where(i2t_pos >= 0, emb.text_to_image[np.maximum(i2t_pos, 0)], -1)
    captioned = np.bincount(emb.text_to_image, minlength=len(emb.image)) > 0
    mine = owner == np.arange(len(emb.image))[:, None]
    i2t = metrics.listed_ranks(mine, i2t_scores)[captioned]
    m = {}
    for key, ranks in (("image_retrieval", t2i), ("text_retrieval", i2t)):
        for k, v in metrics.recall_at_k(ranks, ks).items():
            m[f"{key}_recall@{k}"] = v
    return Row(
        name,
        m,
        {
            "image_retrieval": metrics.recall_curve(t2i, max_k),
            "text_retrieval": metrics.recall_curve(i2t, max_k),
        },
    )


def _hits(index: VectorIndex, queries: np.ndarray, max_k: int, to_position, room: int = 1):
    """(Q, max_k + room) positions and scores. ``room``: the most correct results a query has;
    with that many more than reported, recall@k up to max_k is exact (`metrics.listed_ranks`)."""
    k = max_k + room
    pos = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for q, nb in enumerate(index.search(queries, k)):
        pos[q, : len(nb.ids)] = to_position(nb.ids)
        scores[q, : len(nb.ids)] = nb.scores
    return pos, scores


def ann_row(factory: str, emb: Embedded, ks, max_k: int) -> Row:
    """Build ``factory`` over the embeddings and evaluate through it."""
    images = VectorIndex.build(emb.image, np.arange(len(emb.image)), factory)
    captions = VectorIndex.build(emb.text, np.arange(len(emb.text)), factory)
    t2i = _hits(images, emb.text, max_k, lambda ids: ids)
    i2t = _hits(captions, emb.image, max_k, lambda ids: ids, _most_captions(emb))
    return _rows_from_hits(f"index {images.factory}", t2i, i2t, emb, ks, max_k)


def _most_captions(emb: Embedded) -> int:
    return int(np.bincount(emb.text_to_image).max()) if len(emb.text_to_image) else 1


def built_index_row(searcher: Searcher, emb: Embedded, ks, max_k: int) -> Row:
    """Evaluate through the built index's query path, `Searcher.search_many` (the dataset's
    embeddings as vector queries, plain cosine); its other items are distractors. Image->text
    ranks items by their best caption, as a search by image answers."""
    position = {item_id: i for i, item_id in enumerate(emb.item_ids)}
    # An item's position -> a dataset caption of it (any will do: correctness is by owner).
    first_caption = np.full(len(emb.image) + 1, -2, dtype=np.int64)  # [-1]: not in the dataset
    owners, firsts = np.unique(emb.text_to_image, return_index=True)
    first_caption[owners] = firsts
    t2i = _query_path_hits(searcher, emb.text, "images", max_k, position)
    items, scores = _query_path_hits(searcher, emb.image, "captions", max_k, position)
    i2t = (np.where(items >= 0, first_caption[items], items), scores)
    return _rows_from_hits(f"index {searcher.images.factory} (built)", t2i, i2t, emb, ks, max_k)


def _query_path_hits(searcher: Searcher, queries: np.ndarray, target: str, max_k: int, position):
    """(Q, max_k + 1) dataset positions of the items each query finds (-1: none, -2: not in the
    dataset) and their scores, in batches of `QUERY_BATCH`."""
    k = max_k + 1
    pos = np.full((len(queries), k), -1, dtype=np.int64)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start in range(0, len(queries), QUERY_BATCH):
        batch = queries[start : start + QUERY_BATCH]
        requests = [Request(Query(vector=q), k=k, target=target) for q in batch]
        for q, answer in enumerate(searcher.search_many(requests), start):
            found = answer["results"]
            pos[q, : len(found)] = [position.get(r["id"], -2) for r in found]
            scores[q, : len(found)] = [r["score"] for r in found]
    return pos, scores


def _row_from_ranks(name: str, t2i, i2t, ks, max_k: int) -> Row:
    m, curves = {}, {}
    for key, ranks in (("image_retrieval", t2i), ("text_retrieval", i2t)):
        if ranks is None:
            continue
        for k, v in metrics.recall_at_k(ranks, ks).items():
            m[f"{key}_recall@{k}"] = v
        curves[key] = metrics.recall_curve(ranks, max_k)
    return Row(name, m, curves)


def strategy_rows(emb: Embedded, config: BenchConfig, encoder: Encoder, ks, max_k) -> list[Row]:
    """One row per query-layer strategy (see `retrieval.eval.strategies`)."""
    rows = []
    if config.bank is not None:
        bank_images, bank_text = querybank.encode_bank(config.bank, encoder, config.read)
        qb = config.querybank
        t2i, i2t = strategies.qbnorm_ranks(
            emb.image,
            emb.text,
            emb.text_to_image,
            querybank.normalisers(emb.image, bank_text, qb),
            querybank.normalisers(emb.text, bank_images, qb),
            qb.beta,
        )
        name = f"qbnorm (beta {qb.beta:g}, m {qb.m}, bank {Path(config.bank).name})"
        rows.append(_row_from_ranks(name, t2i, i2t, ks, max_k))
    for rrf in (False, True):
        t2i = strategies.hybrid_ranks(emb.image, emb.text, emb.text_to_image, config.mix, rrf)
        name = "hybrid-rrf" if rrf else f"hybrid (mix {config.mix:g})"
        rows.append(_row_from_ranks(name, t2i, None, ks, max_k))
    return rows


def _inputs(emb: Embedded, searcher, encoder: Encoder, config: BenchConfig) -> rerank.Inputs:
    """The re-ranker (the index's, or the model's own, or ``config.reranker``'s) and its
    inputs for every image and caption of the dataset."""
    if searcher is not None:
        model = searcher.reranking().reranker
    else:
        source = config.reranker or encoder.spec.checkpoint
        model = reranker_module.load(source, encoder.model) if source else None
        if model is None:
            raise RetrievalError(
                f"{'no re-ranker in ' + str(source) if source else 'the model has no re-ranker'}"
                ": train one with `retrieval train ... --itm`, or give --reranker"
            )
    images = emb.patches if emb.patches is not None else emb.paths
    return rerank.Inputs.of(model, encoder, images, emb.texts, config)


def reranked_rows(rows: list[Row], emb: Embedded, inputs: rerank.Inputs, config) -> list[Row]:
    """``rows`` with a "+ rerank@N" row after each first stage the re-ranker can follow."""
    n, ks, max_k = config.rerank, tuple(sorted(set(config.ks))), max(max(config.ks), 10)
    owner = emb.text_to_image
    items = np.arange(len(emb.image))

    def own(rows_):
        return owner[rows_, None] == items[None, :]

    def exact(rows_):
        return emb.text[rows_] @ emb.image.T

    stages = {
        "exact": (exact, own, True),
        f"hybrid (mix {config.mix:g})": (_hybrid(emb, config.mix, False), own, False),
        "hybrid-rrf": (_hybrid(emb, config.mix, True), own, False),
    }
    if config.group_key:
        groups = emb.groups
        same = lambda rows_: groups[owner[rows_], None] == groups[None, :]  # noqa: E731
        stages[f"exact, any image of the same {config.group_key}"] = (exact, same, False)
    out = []
    for row in rows:
        out.append(row)
        if row.strategy not in stages:
            continue
        scores, correct, both = stages[row.strategy]
        t2i = rerank.text_to_image(inputs, n, scores, correct)
        i2t = rerank.image_to_text(inputs, n, emb.image, emb.text, owner) if both else None
        out.append(_row_from_ranks(f"{row.strategy} + rerank@{n}", t2i, i2t, ks, max_k))
    return out


def _hybrid(emb: Embedded, mix: float, rrf: bool):
    return lambda rows: strategies.hybrid_scores(
        emb.image, emb.text, emb.text_to_image, (mix, rrf), rows
    )


def runtime_rows(records, config: BenchConfig, ks, max_k: int) -> list[Row]:
    """The exact row of ``records`` encoded by each runtime and precision, with the cosine of
    each embedding to its torch fp32 twin (``image_cosine_mean``, ``text_cosine_min``, ...).
    On the CPU, where the runtimes differ (on CUDA the towers always run in torch)."""
    rows, reference = [], None
    for runtime in ALL_RUNTIMES:
        chosen = RuntimeChoice(runtime.engine, runtime.precision)
        asked = replace(config, runtime=chosen, rerank=None, device="cpu")
        emb, encoder = embed_with_model(records, asked)
        reference = reference or emb
        if emb.item_ids != reference.item_ids:  # decoding is the runtime's no business
            raise RetrievalError(f"{runtime} decoded other images than {TORCH_FP32}")
        row = exact_row(emb, ks, max_k)
        row.strategy = f"exact [{encoder.runtime}]"
        for kind in ("image", "text"):
            cosines = metrics.row_cosines(getattr(emb, kind), getattr(reference, kind))
            row.metrics[f"{kind}_cosine_mean"] = float(cosines.mean())
            row.metrics[f"{kind}_cosine_min"] = float(cosines.min())
        rows.append(row)
    return rows


def run_bench(
    dataset: str | Path, config: BenchConfig, save_embeddings: Path | None = None
) -> BenchResult:
    """Evaluate ``config.model`` (or index ``config.index``) on ``dataset``."""
    if not config.ks or min(config.ks) < 1:
        raise RetrievalError(f"every k must be at least 1: {', '.join(map(str, config.ks))}")
    records, skipped = load_dataset(Path(dataset), config)
    ks = tuple(sorted(set(config.ks)))
    max_k = max(max(ks), 10)
    searcher = None
    if config.index:
        searcher = Searcher.open(
            config.index,
            config.index_dir,
            model=config.model,
            device=config.device,
            reranker=config.reranker,
            runtime=config.runtime,
        )
        emb, model_info = embed_from_index(records, searcher, config), searcher.encoder.spec
        encoder = searcher.encoder
    else:
        emb, encoder = embed_with_model(records, config)
        model_info = encoder.spec
    try:
        rows = [exact_row(emb, ks, max_k)]
        if searcher is not None:
            rows.append(built_index_row(searcher, emb, ks, max_k))
        rows += [ann_row(f, emb, ks, max_k) for f in config.factories]
        rows += strategy_rows(emb, config, searcher.encoder if searcher else encoder, ks, max_k)
        if config.group_key:
            rows.append(grouped_row(emb, ks, max_k, config.group_key))
        if config.rerank:
            rows = reranked_rows(rows, emb, _inputs(emb, searcher, encoder, config), config)
        if config.runtime_rows:
            rows += runtime_rows(records, replace(config, model=model_info), ks, max_k)
    finally:
        if searcher is not None:
            searcher.close()
    if save_embeddings:
        np.savez(
            save_embeddings,
            image=emb.image,
            text=emb.text,
            text_to_image=emb.text_to_image,
            item_ids=np.array(emb.item_ids),
        )
    counts = (len(emb.image), len(emb.text), len(skipped))
    return BenchResult(str(dataset), model_info, encoder.runtime, rows, *counts)
