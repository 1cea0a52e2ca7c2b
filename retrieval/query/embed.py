"""Query terms -> query vectors: a batch of texts in one forward pass, its images in another,
each looked up in the embedding cache first; vectors computed elsewhere checked to fit.

Images are first `prepare`d (decoded, resized, normalised, hashed). A server does that in its
request threads, so the thread that encodes a batch only stacks pixels; Python callers may
hand over paths or PIL images and the batch prepares them itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..corpus.images import BadImage, load_image
from ..errors import EncoderError, SearchError
from ..index.manifest import Manifest
from ..model.encoder import Encoder
from .cache import EmbeddingCache
from .terms import ImageLike, PreparedImage, QueryTerm

Embedded = np.ndarray | SearchError | EncoderError  # a term's (1, D) vector, or why not


class TermEncoder:
    """The encoder and the cache of one searcher: what each query term's vector is."""

    def __init__(self, encoder: Encoder, cache: EmbeddingCache, manifest: Manifest) -> None:
        self.encoder, self.cache = encoder, cache
        self.manifest = manifest  # the index's: what a vector computed elsewhere must fit

    def prepare(self, image: ImageLike) -> PreparedImage:
        """``image`` (a path, a PIL image) as the model's input and its digest."""
        if isinstance(image, PreparedImage):
            return image
        if not isinstance(image, Image.Image):
            try:
                image = load_image(image)
            except BadImage as e:
                raise SearchError(f"cannot use the query image: {e}") from None
        pixels = self.encoder.prepare(image)
        digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).hexdigest()
        return PreparedImage(pixels, digest)

    def embed(self, term: QueryTerm) -> np.ndarray:
        """The term's (1, D) unit vector."""
        (out,) = self.embed_many([term])
        if isinstance(out, Exception):
            raise out
        return out

    def embed_many(self, terms: Sequence[QueryTerm]) -> list[Embedded]:
        """Each term's (1, D) unit vector, or its one-line error: the texts and the images
        missing from the cache are encoded in one forward pass each (a text or an image
        repeated in the batch once)."""
        out: list[Embedded | None] = [None] * len(terms)
        texts: dict[str, list[int]] = {}  # cache misses, each with the terms it answers
        images: dict[str, tuple[torch.Tensor, list[int]]] = {}
        for i, term in enumerate(terms):
            try:
                out[i] = self._known(term, texts, images, i)
            except SearchError as e:
                out[i] = e
        if texts:
            self._encode(out, "t", texts, lambda: self.encoder.encode_texts(list(texts)))
        if images:
            pixels = [p for p, _ in images.values()]
            waiting = {d: rows for d, (_, rows) in images.items()}
            self._encode(out, "i", waiting, lambda: self.encoder.encode_pil(pixels))
        return out  # type: ignore[return-value]

    def _known(self, term: QueryTerm, texts: dict, images: dict, i: int) -> np.ndarray | None:
        """The term's vector when it needs no encoding (given, or cached); else None, with
        the term noted in ``texts`` or ``images`` (SearchError: a bad term)."""
        given = [x is not None for x in (term.text, term.image, term.vector)]
        if sum(given) != 1:
            raise SearchError("each query term is exactly one of a text, an image or a vector")
        if term.vector is not None:
            return self.vector(term.vector)
        if term.text is not None:
            if not term.text.strip():
                raise SearchError("the text query is empty")
            key = term.text
        else:
            prepared = self.prepare(term.image)
            key = prepared.digest
        kind = "t" if term.text is not None else "i"
        cached = self.cache.get((kind, key))
        if cached is not None:
            return cached
        if kind == "t":
            texts.setdefault(key, []).append(i)
        else:
            images.setdefault(key, (prepared.pixels, []))[1].append(i)
        return None

    def _encode(self, out: list, kind: str, waiting: dict[str, list[int]], encode) -> None:
        """Encode one modality's misses; an encoder failure is every waiting term's error."""
        try:
            vectors = encode()
        except EncoderError as e:
            for rows in waiting.values():
                for i in rows:
                    out[i] = e
            return
        for (key, rows), vec in zip(waiting.items(), vectors, strict=True):
            self.cache.put((kind, key), vec[None, :])
            for i in rows:
                out[i] = vec[None, :]

    def tokens(self, term: QueryTerm) -> tuple:
        """A re-ranked query's (1, D) vector, then its states and mask or its patches (never
        cached: the tokens are large)."""
        if term.text is not None:
            if not term.text.strip():
                raise SearchError("the text query is empty")
            return self.encoder.text_query([term.text])
        return self.encoder.image_query([self.prepare(term.image).pixels])

    def vector(self, vector) -> np.ndarray:
        """A vector computed elsewhere as a (1, D) unit query, once checked to fit the index."""
        try:
            v = np.asarray(vector, dtype=np.float64)
        except (TypeError, ValueError):
            raise SearchError("the query vector must be a list of numbers") from None
        if v.ndim == 2 and v.shape[0] == 1:
            v = v[0]
        if v.ndim != 1:
            raise SearchError(f"the query vector must be one vector, not an array of {v.shape}")
        m = self.manifest
        if len(v) != m.dim:
            raise SearchError(
                f"the query vector has {len(v)} numbers; index {m.name!r} holds {m.dim}-d "
                f"vectors of model {m.model}"
            )
        if not np.isfinite(v).all():
            raise SearchError("the query vector holds NaN or infinite numbers")
        norm = np.linalg.norm(v)
        if norm < 1e-12:
            raise SearchError("the query vector is all zeros: it points nowhere")
        return np.ascontiguousarray((v / norm)[None, :], dtype=np.float32)
