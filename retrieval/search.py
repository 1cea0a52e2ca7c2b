"""The query path: encode the query, ask FAISS for candidates, resolve them in LMDB.

A text query searches item images by default (text->image); an image query searches captions
(image->text) and returns the items whose caption matched, with that caption. ``target`` picks
the other two directions: text->text (captions) and image->image (images).

Results follow one shape everywhere (Python, ``--json``, HTTP)::

    {"rank", "id", "score", "path", "captions", "extra"[, "caption": {"id", "text"}]}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import layout
from .encoder import Encoder, ModelSpec, sha256_file
from .errors import SearchError
from .images import BadImage, load_image
from .index import VectorIndex
from .store import Store

log = logging.getLogger(__name__)

TARGETS = ("images", "captions")
_OVERFETCH = 4  # caption hits per wanted item: several captions of one item collapse to one


@dataclass(frozen=True)
class Query:
    """A text or an image (a path or a decoded picture); exactly one of the two."""

    text: str | None = None
    image: str | Path | Image.Image | None = None

    def describe(self) -> dict[str, Any]:
        if self.text is not None:
            return {"text": self.text}
        return {"image": str(self.image) if not isinstance(self.image, Image.Image) else "<image>"}


def check_model(manifest: dict, spec: ModelSpec | None) -> None:
    """Refuse to query an index with a model other than the one it was built with."""
    if spec is None:
        return
    asked = spec.describe()
    same_weights = (
        asked["checkpoint_sha256"] == manifest.get("checkpoint_sha256")
        if manifest.get("checkpoint_sha256") or asked["checkpoint_sha256"]
        else asked["pretrained"] == manifest.get("pretrained")
    )
    if asked["model"] != manifest["model"] or not same_weights:
        raise SearchError(
            f"index {manifest['name']!r} was built with model {manifest['model']} "
            f"(pretrained: {manifest.get('pretrained') or 'none'}), not {asked['model']} "
            f"(pretrained: {asked['pretrained'] or 'none'}); search it without --model, "
            "or rebuild it with the model you want"
        )


def _spec_from_manifest(manifest: dict) -> ModelSpec:
    pretrained, sha = manifest.get("pretrained"), manifest.get("checkpoint_sha256")
    if sha:
        path = Path(pretrained)
        if not path.is_file():
            raise SearchError(f"the checkpoint this index was built with is gone: {path}")
        if sha256_file(path) != sha:
            raise SearchError(f"the checkpoint {path} changed since the index was built")
    return ModelSpec(manifest["model"], pretrained)


class Searcher:
    """An open index: FAISS indexes, the store and the model, loaded once, then queried."""

    def __init__(self, folder: Path, encoder: Encoder | None = None, device: str = "auto") -> None:
        self.folder = folder
        self.manifest = layout.read_manifest(folder)
        self.encoder = encoder or Encoder.load(_spec_from_manifest(self.manifest), device)
        faiss_device = "cuda" if self.encoder.device.type == "cuda" else "cpu"
        idx = self.manifest["indexes"]
        self.images = VectorIndex.load(
            folder / layout.IMAGE_INDEX, idx["image"]["factory"], faiss_device
        )
        self.captions = VectorIndex.load(
            folder / layout.CAPTION_INDEX, idx["caption"]["factory"], faiss_device
        )
        self.store = Store.open(folder / layout.STORE)

    @classmethod
    def open(
        cls,
        name: str,
        index_dir: str | Path | None = None,
        model: ModelSpec | None = None,
        device: str = "auto",
        encoder: Encoder | None = None,
    ) -> Searcher:
        """Open index ``name``; ``model``, when given, must be the one the index was built with."""
        folder = layout.resolve(name, index_dir)
        check_model(layout.read_manifest(folder), model)
        return cls(folder, encoder=encoder, device=device)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        return {**self.manifest, "folder": str(self.folder), "store": self.store.counts()}

    def embed(self, query: Query) -> np.ndarray:
        """The query's (1, D) unit vector."""
        if (query.text is None) == (query.image is None):
            raise SearchError("give exactly one of a text or an image query")
        if query.text is not None:
            if not query.text.strip():
                raise SearchError("the text query is empty")
            return self.encoder.encode_texts([query.text])
        image = query.image
        if not isinstance(image, Image.Image):
            try:
                image = load_image(image)
            except BadImage as e:
                raise SearchError(f"cannot use the query image: {e}") from None
        return self.encoder.encode_pil([image])

    def search(self, query: Query, k: int = 10, target: str | None = None) -> dict[str, Any]:
        """``{"query": ..., "target": ..., "results": [...]}`` with the ``k`` best items."""
        if k < 1:
            raise SearchError(f"k must be at least 1, not {k}")
        target = target or ("images" if query.text is not None else "captions")
        if target not in TARGETS:
            raise SearchError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
        vec = self.embed(query)
        hits = self._images(vec, k) if target == "images" else self._captions(vec, k)
        results = [
            self._result(rank, item_id, score, cap)
            for rank, (item_id, score, cap) in enumerate(hits, 1)
        ]
        return {"query": query.describe(), "target": target, "results": results}

    def _images(self, vec: np.ndarray, k: int) -> list[tuple[str, float, None]]:
        nb = self.images.search(vec, k)[0]
        ids = self.store.item_ids(nb.ids)
        return [(i, float(s), None) for i, s in zip(ids, nb.scores, strict=True) if i]

    def _captions(self, vec: np.ndarray, k: int) -> list[tuple[str, float, dict]]:
        """Best caption per item: fetch more caption hits until k distinct items or exhausted."""
        fetch = k * _OVERFETCH
        while True:
            nb = self.captions.search(vec, fetch)[0]
            best: dict[str, dict] = {}  # item id -> its best caption, best first
            for cid in self.store.caption_ids(nb.ids):
                cap = self.store.caption(cid) if cid else None
                if cap and cap["item"] not in best:
                    best[cap["item"]] = cap
            exhausted = len(nb.ids) < fetch or fetch >= self.captions.ntotal
            if len(best) >= k or exhausted:
                break
            fetch *= 4
        score = dict(zip(self.store.caption_ids(nb.ids), nb.scores.tolist(), strict=True))
        ranked = list(best.values())[:k]
        return [(c["item"], score[c["id"]], {"id": c["id"], "text": c["text"]}) for c in ranked]

    def _result(self, rank: int, item_id: str, score: float, caption: dict | None) -> dict:
        item = self.store.item(item_id) or {}
        out = {
            "rank": rank,
            "id": item_id,
            "score": round(score, 6),
            "path": item.get("path"),
            "captions": [c["text"] for c in item.get("captions", [])],
            "extra": item.get("extra", {}),
        }
        if caption is not None:
            out["caption"] = caption
        return out


def search(
    name: str,
    text: str | None = None,
    image: str | Path | None = None,
    k: int = 10,
    target: str | None = None,
    index_dir: str | Path | None = None,
    model: ModelSpec | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """One-shot search: open index ``name``, run one query, close it."""
    with Searcher.open(name, index_dir, model=model, device=device) as s:
        return s.search(Query(text=text, image=image), k=k, target=target)
