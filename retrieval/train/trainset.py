"""Training and validation pairs in memory: cached pixels, tokenised captions, caption draws."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..corpus.filters import group_codes
from ..corpus.records import Record
from ..scoring.metrics import retrieval_metrics
from . import augment, pixel_cache


@dataclass
class Features:
    """Cached outputs of fully locked towers (`retrieval.train.feature_cache`), on the device:
    ``image`` (views, N, ...): [v, i] for view v of usable item i; ``text`` (C, ...): row c for
    caption c. None for a tower that runs live."""

    image: torch.Tensor | None = None
    text: torch.Tensor | None = None


@dataclass
class TrainSet:
    """Usable items: ``pixels`` (N, H, W, 3) uint8, captions tokenised once.

    ``tokens`` (C, L) int64 for all captions; ``caption_rows[i]`` the rows of item i's captions;
    ``caption_ids`` (C,) int64, equal for equal caption texts (multi-positive targets).
    """

    pixels: np.ndarray
    rows: np.ndarray  # (N,) row of each usable item in `pixels`
    tokens: torch.Tensor
    caption_rows: list[np.ndarray]
    caption_ids: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)
    groups: np.ndarray | None = None  # (N,) int64 batch group of each item, or None
    source: str = ""  # the decoded pixels' cache file: names the images and their geometry

    def __len__(self) -> int:
        return len(self.rows)

    def batch(
        self,
        items: np.ndarray,
        caps: np.ndarray,
        device,
        features: Features | None = None,
        views: np.ndarray | None = None,
    ) -> tuple:
        """Images (B, 3, H, W), tokens (B, L) and ids (B, 2) of pairs (``items``, ``caps``).

        A tower's cached features stand in for its input where ``features`` has them;
        ``views`` (N,): the augmented view each item shows (None: the image itself). The ids
        are (caption id, item): pairs sharing either are positives of each other.
        """
        order = np.argsort(self.rows[items], kind="stable")  # memmap reads in file order
        items, caps = items[order], caps[order]
        shown = views[items] if views is not None else None
        features = features or Features()
        images = self._images(items, shown, features.image)
        if features.text is not None:
            texts = features.text[torch.from_numpy(caps).to(features.text.device)]
        else:
            texts = self.tokens[caps]
        ids = torch.stack([self.caption_ids[caps], torch.from_numpy(items)], dim=1)
        return images.to(device), texts.to(device), ids.to(device)

    def _images(self, items: np.ndarray, shown: np.ndarray | None, cached) -> torch.Tensor:
        if cached is not None:  # (views, N, ...)
            v = np.zeros_like(items) if shown is None else shown
            at = cached.device
            return cached[torch.from_numpy(v).to(at), torch.from_numpy(items).to(at)]
        pixels = self.pixels[self.rows[items]]
        if shown is None:
            return pixel_cache.to_model_input(pixels, self.mean, self.std)
        places = augment.boxes(self.rows[items], shown, pixels.shape[1])
        return augment.crops(pixels, places, self.mean, self.std)

    def caption_owner(self) -> np.ndarray:
        """(C,) int64: the item of each caption row of ``tokens``."""
        owner = np.concatenate([np.full(len(r), i) for i, r in enumerate(self.caption_rows)])
        order = np.concatenate(self.caption_rows)
        out = np.empty(len(order), dtype=np.int64)
        out[order] = owner
        return out

    def _inputs(self, kind: str, span: slice, features: Features | None) -> torch.Tensor:
        cached = getattr(features, kind, None)
        if cached is not None:
            return cached[0][span] if kind == "image" else cached[span]
        if kind == "text":
            return self.tokens[span]
        return pixel_cache.to_model_input(self.pixels[self.rows[span]], self.mean, self.std)

    @torch.no_grad()
    def evaluate(
        self, model, device, batch: int = 256, features: Features | None = None
    ) -> dict[str, float]:
        """Recall@1/5/10 both ways over every image and every caption (exact search).

        ``model``: open_clip's, or `CachedTowers` over it with this set's ``features``.
        """
        was_training = model.training
        model.eval()
        img = [
            model.encode_image(
                self._inputs("image", slice(s, s + batch), features).to(device), normalize=True
            )
            .float()
            .cpu()
            for s in range(0, len(self.rows), batch)
        ]
        txt = [
            model.encode_text(
                self._inputs("text", slice(s, s + batch), features).to(device), normalize=True
            )
            .float()
            .cpu()
            for s in range(0, len(self.tokens), batch)
        ]
        model.train(was_training)
        m = retrieval_metrics(torch.cat(img).numpy(), torch.cat(txt).numpy(), self.caption_owner())
        return {f"val_{k}": round(v, 4) for k, v in m.items() if "recall@" in k}


def split_records(records: Sequence[Record], fraction: float, seed: int):
    """Hold out ``fraction`` of the items (whole items, never single captions)."""
    if not fraction:
        return list(records), []
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), not {fraction}")
    rng = np.random.default_rng([seed, 12345])
    held = set(rng.permutation(len(records))[: max(1, round(fraction * len(records)))].tolist())
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


def load_trainset(
    records: Sequence[Record],
    encoder,
    cache_dir: Path,
    workers: int,
    progress: bool,
    group_field: str | None = None,
) -> TrainSet:
    """Decode (once, cached) and tokenise; drop items with no usable image or caption.

    ``group_field``: items with equal values of this metadata field form a batch group (see
    `retrieval.train.sampling.epoch_batches`); an item without the field is a group of its own.
    """
    size = _image_size(encoder)
    px, failures = pixel_cache.load_or_build(
        [r.image for r in records], size, cache_dir, workers, progress=progress
    )
    skipped = [(records[i].id, why) for i, why in sorted(failures.items())]
    rows, texts, caption_rows = [], [], []
    for i, r in enumerate(records):
        caps = [c for c in r.captions if c]
        if i in failures:
            continue
        if not caps:
            skipped.append((r.id, "no caption"))
            continue
        rows.append(i)
        caption_rows.append(np.arange(len(texts), len(texts) + len(caps)))
        texts.extend(caps)
    index = {t: k for k, t in enumerate(dict.fromkeys(texts))}
    mean, std = pixel_cache.normaliser(encoder.preprocess)
    return TrainSet(
        pixels=px,
        rows=np.asarray(rows, dtype=np.int64),
        tokens=encoder.tokenizer(texts) if texts else torch.zeros(0, encoder.context_length),
        caption_rows=caption_rows,
        caption_ids=torch.tensor([index[t] for t in texts], dtype=torch.int64),
        mean=mean,
        std=std,
        skipped=skipped,
        groups=group_codes([records[i] for i in rows], group_field) if group_field else None,
        source=Path(getattr(px, "filename", None) or "").name,  # pixels-<key>.npy
    )


def _image_size(encoder) -> int:
    size = encoder.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)
