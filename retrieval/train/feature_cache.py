"""Encode a fully locked tower once per run (LiT): training then runs only what comes after it.

A tower whose weights are all locked (``--lock-image 0``, ``--lock-text 0``) computes the same
features for an input in every epoch (`retrieval.train.locking` keeps it in eval mode), so each
training image and each caption is run through it once, and epochs train the projections (and
the logit scale) over the stored features: seconds instead of minutes on a CPU.

What is cached is the output of the tower's locked part (`retrieval.train.splits.Side`): for
open_clip's timm tower the trunk's pooled features before ``visual.head`` (the projection), for
its Hugging Face tower the pooled hidden states before ``text.proj``; a tower locked whole is
cached whole. Features are captured where the trained part starts while the model itself runs,
so they are exactly what the live forward would feed it.

Images are encoded in each of their augmented views (`retrieval.train.augment`; one, the image
itself, by default), so augmentation costs an encoding per view, once, not a forward per step.

The files (``cache/features-<side>-<key>.npy``, beside the decoded pixels) are keyed by the
locked part's weights (a digest), its inputs (the pixel cache's key, rows, normalisation and
views; the caption token ids), the precision and a format version: other weights or other
preprocessing build a new file, and a resumed run finds its own. The features are held whole in
memory on the training device: (views x images + captions) x 1,280 or 384 float32 for
effnet-minilm.

A partly open tower is cached up to its first open module where `retrieval.train.splits` knows
a split (an EfficientNet trunk, a mean-pooled BERT text tower). That is cheaper in compute
whatever is open, so the only limit is memory: feature maps (320 x 7 x 7 a view with the last
group open) or hidden states (tokens x 385) for a set past `PARTIAL_CACHE_BYTES` run live.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write
from . import augment, pixel_cache
from .splits import Side
from .trainset import Features, TrainSet

log = logging.getLogger(__name__)

VERSION = "features v1"
PARTIAL_CACHE_BYTES = 4 << 30  # a partly open trunk's cached feature maps, at most, per set


class CachedTowers(torch.nn.Module):
    """``model(images, texts)`` as open_clip's forward, where a cached side takes its locked
    part's features in place of pixels or token ids. The parameters are the model's own."""

    def __init__(self, model: torch.nn.Module, image: Side | None, text: Side | None) -> None:
        super().__init__()
        self.model = model
        self.sides = {"image": image, "text": text}  # a dict: not registered a second time

    def _encode(self, kind: str, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        side = self.sides[kind]
        if side is None:
            f = getattr(self.model, f"encode_{kind}")(x)
        else:
            f = x if side.head is None else side.head(x)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode("image", x, normalize)

    def encode_text(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._encode("text", x, normalize)

    def forward(self, images: torch.Tensor, texts: torch.Tensor):
        return (
            self.encode_image(images, normalize=True),
            self.encode_text(texts, normalize=True),
            self.model.logit_scale.exp(),
        )


def cache_key(kind: str, side: Side, inputs: str, precision: str) -> str:
    h = hashlib.sha256(f"{VERSION}\n{kind}\n{precision}\n{inputs}\n".encode())
    h.update(side.digest.encode())
    return h.hexdigest()[:16]


def inputs_id(kind: str, data: TrainSet, views: int = 1) -> str:
    """What a side's features are computed from: decoded pixels (their cache file, the rows
    used, the normalisation and the augmented views) or the captions' token ids."""
    h = hashlib.sha256()
    if kind == "image":
        h.update(f"{data.source}\n{views} {augment.VERSION if views > 1 else ''}\n".encode())
        for t in (torch.from_numpy(data.rows), data.mean, data.std):
            h.update(t.contiguous().numpy().tobytes())
    else:
        h.update(data.tokens.contiguous().numpy().tobytes())
    return h.hexdigest()


def _inputs(kind: str, data: TrainSet, span: slice, view: int) -> torch.Tensor:
    if kind == "text":
        return data.tokens[span]
    rows = data.rows[span]
    if view == 0:
        return pixel_cache.to_model_input(data.pixels[rows], data.mean, data.std)
    places = augment.boxes(rows, np.full(len(rows), view), data.pixels.shape[1])
    return augment.crops(data.pixels[rows], places, data.mean, data.std)


@dataclass(frozen=True)
class Encoding:
    """Where a locked tower's features are kept and how they are computed."""

    cache_dir: Path
    device: Any
    autocast: Callable  # () -> a context manager
    precision: str  # part of the cache key: fp32 features differ from bf16 ones
    views: int = 1  # views of each image (itself and augmented crops)


@torch.no_grad()
def encode_side(
    kind: str, side: Side, data: TrainSet, how: Encoding, batch: int = 256
) -> torch.Tensor:
    """Float32 features of every caption (text: (C, ...)) or of each view of every usable
    item (image: (views, N, ...))."""
    n = len(data) if kind == "image" else len(data.tokens)
    out = []
    for view in range(how.views if kind == "image" else 1):
        parts = []
        for s in range(0, n, batch):
            with how.autocast():
                x = _inputs(kind, data, slice(s, s + batch), view).to(how.device)
                parts.append(side.locked_part(x).float().cpu())
        out.append(torch.cat(parts) if parts else torch.zeros(0))
    return torch.stack(out) if kind == "image" else out[0]


@torch.no_grad()
def fits(
    kind: str, side: Side, sets: list[TrainSet | None], how: Encoding, views: list[int]
) -> bool:
    """Whether a partly open tower's intermediate features for ``sets`` (images each in its
    ``views``) stay within `PARTIAL_CACHE_BYTES` each; a whole tower's pooled ones always do."""
    if not side.partial:
        return True
    probe = next((s for s in sets if s is not None and len(s)), None)
    if probe is None:
        return True
    with how.autocast():
        one = side.locked_part(_inputs(kind, probe, slice(0, 1), 0).to(how.device))
    size = one[0].numel() * 4  # stored as float32
    rows = [
        (len(s) * v if kind == "image" else len(s.tokens))
        for s, v in zip(sets, views, strict=True)
        if s is not None
    ]
    need = size * max(rows)
    if need > PARTIAL_CACHE_BYTES:
        log.info("the locked part of the %s tower is not cached: %.1f GiB", kind, need / 2**30)
    return need <= PARTIAL_CACHE_BYTES


def load_or_build(kind: str, side: Side, data: TrainSet, how: Encoding) -> torch.Tensor:
    """The side's features for ``data``, from the cache or encoded now and stored there."""
    key = cache_key(kind, side, inputs_id(kind, data, how.views), how.precision)
    path = how.cache_dir / f"features-{kind}-{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    log.info("encoding the locked %s tower's features once (%s)", kind, path.name)
    features = encode_side(kind, side, data, how)
    how.cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.save(f, features.numpy())
    return features


def features_for(sides: dict[str, Side | None], data: TrainSet, how: Encoding) -> Features:
    """The cached sides' features of ``data``, on ``how.device``; None for a side not cached."""
    got = {
        kind: load_or_build(kind, side, data, how).to(how.device)
        for kind, side in sides.items()
        if side is not None
    }
    return Features(image=got.get("image"), text=got.get("text"))
