"""The second stage: the cross-attention re-ranker re-orders a strategy's top N (``--rerank N``).

The first stage (any strategy of `retrieval.query.ranking`) picks the candidates; the re-ranker
(`retrieval.model.reranker`) reads the query against each of them and only re-orders them: the
candidate set never changes. It scores a text against an image, so it applies to a text query
searching images (the query's token states against each candidate's patch tokens) and to an
image query searching captions (each candidate's best caption against the query's patches).

Where the candidates' patch tokens come from: ``embeddings/patches.npy`` in the index version
when it was built with ``--patch-tokens`` (fp16, memory-mapped: a query decodes no image), else each
candidate's image file is decoded and encoded again at query time (benchmarks/README.md,
"Re-ranker", measures both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import SearchError
from ..index import layout
from ..index.embeddings import PATCHES
from ..model import reranker as reranker_module
from ..model.encoder import Encoder
from ..model.reranker import Reranker
from .ranking import MAX_RERANK, Hit

log = logging.getLogger(__name__)


@dataclass
class Reranking:
    """A loaded re-ranker and where its candidates' patch tokens come from: ``patches``
    (I, P, W) fp16 by item row, or None to decode ``image_of(row)`` and encode it again."""

    encoder: Encoder
    reranker: Reranker
    patches: np.ndarray | None
    image_of: Callable[[int], Image.Image]

    def text_against_images(self, text, hits: Sequence[Hit]) -> list[Hit]:
        """``hits`` (items) re-ordered by how well the query text describes each one's image;
        ``text``: its token states (1, L, W) and mask (1, L) (`Encoder.text_query`)."""
        states, mask = text
        patches = self._patches([h.item for h in hits])
        n = len(hits)
        return _ordered(hits, self._logits(states.expand(n, -1, -1), mask.expand(n, -1), patches))

    def image_against_captions(self, image, hits: Sequence[Hit], texts) -> list[Hit]:
        """``hits`` re-ordered by how well each one's caption (``texts``) describes the query
        image; ``image``: its patch tokens (1, P, W) (`Encoder.image_query`)."""
        states, mask = self.encoder.text_states(list(texts))
        patches = image.expand(len(hits), -1, -1)
        return _ordered(hits, self._logits(states, mask, patches))

    def _patches(self, rows: list[int]) -> torch.Tensor:
        if self.patches is not None:
            return torch.from_numpy(np.asarray(self.patches[rows], dtype=np.float32))
        return self.encoder.image_patches([self.image_of(r) for r in rows])

    @torch.inference_mode()
    def _logits(self, states, mask, patches) -> np.ndarray:
        device = self.encoder.device
        out = self.reranker(states.to(device), mask.to(device), patches.to(device))
        return out.float().cpu().numpy().astype(np.float64)


def _ordered(hits: Sequence[Hit], logits: np.ndarray) -> list[Hit]:
    """Hits sorted by re-ranker logit (ties keep the first stage's order); each hit's score
    becomes the match probability, also shown as ``itm`` beside the first stage's signals."""
    prob = 1 / (1 + np.exp(-logits))
    out = []
    for j in np.argsort(-logits, kind="stable"):
        h = hits[j]
        out.append(replace(h, score=float(prob[j]), scores=h.scores | {"itm": round(prob[j], 6)}))
    return out


def load(folder: Path, encoder: Encoder, source: Path | None, image_of) -> Reranking:
    """The re-ranker for index version ``folder`` searched with ``encoder``: the one in
    checkpoint ``source`` (None: the one saved with the encoder's weights), with the version's
    stored patch tokens if any (else ``image_of(row)`` decodes a candidate's image); a
    one-line SearchError when there is no re-ranker."""
    source = source or encoder.spec.checkpoint
    model = reranker_module.load(Path(source), encoder.model) if source else None
    if model is None:
        where = f"no re-ranker in {source}" if source else "the index model has no re-ranker"
        raise SearchError(
            f"{where}: train one with `retrieval train ... --itm` (--lock-image 0 --lock-text "
            "0 keeps the dual encoder as it is) and pass its checkpoint with --reranker"
        )
    stored = folder / layout.EMBEDDINGS / PATCHES
    patches = np.load(stored, mmap_mode="r") if stored.is_file() else None
    rows = (
        len(np.load(folder / layout.EMBEDDINGS / "image.npy", mmap_mode="r"))
        if patches is not None
        else 0
    )
    if patches is not None and len(patches) != rows:
        raise SearchError(
            f"{stored} holds {len(patches)} rows for {rows} images: the index is damaged; "
            f"`retrieval verify {folder.parent.name}` checks it"
        )
    if patches is None:
        log.warning(
            "index %s stores no patch tokens: each --rerank query decodes and encodes its "
            "candidates' images; `retrieval build ... --patch-tokens` stores them",
            folder.parent.name,
        )
    return Reranking(encoder, model, patches, image_of)


def check(rerank: int, terms: Sequence, target: str) -> str:
    """Which pairing a re-ranked query uses ("text" or "image"); a one-line SearchError when
    the query cannot be re-ranked."""
    if not 1 <= rerank <= MAX_RERANK:
        raise SearchError(f"rerank must be between 1 and {MAX_RERANK}, not {rerank}")
    if len(terms) == 1 and terms[0].text is not None and target == "images":
        return "text"
    if len(terms) == 1 and terms[0].image is not None and target == "captions":
        return "image"
    raise SearchError(
        "--rerank scores a text against an image: it re-ranks a text query searching images or "
        "an image query searching captions, not this query"
    )
