"""Augmented views of the decoded training images: random resized crops, never flips.

No horizontal flips: captions say "left" and "right". The crops are cut from the decoded pixel
cache (the model-sized centre crop) and resized back to the model's input size. View 0 of an
image is the image itself; view v > 0 is a crop drawn from (pixel row, v) alone, so every run
over the same pixel cache sees the same views and a locked tower's features of all of them can
be cached once (`retrieval.train.feature_cache`); which view an image shows in an epoch is
drawn per epoch (`retrieval.train.sampling`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

SCALE = (0.5, 1.0)  # fraction of the image's area a crop keeps
RATIO = (3 / 4, 4 / 3)  # its aspect ratio
VERSION = f"crops v1 {SCALE} {RATIO}"  # part of the feature cache's key


def boxes(rows: np.ndarray, views: np.ndarray, size: int) -> np.ndarray:
    """(B, 4) int64 (top, left, height, width) of view ``views[k]`` of pixel row ``rows[k]``."""
    out = np.empty((len(rows), 4), dtype=np.int64)
    for k, (r, v) in enumerate(zip(rows.tolist(), views.tolist(), strict=True)):
        out[k] = (0, 0, size, size) if v == 0 else _box(np.random.default_rng([r, v, 29]), size)
    return out


def _box(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    # torchvision's RandomResizedCrop rule, with this generator: ten tries, else the whole image.
    for _ in range(10):
        area = size * size * rng.uniform(*SCALE)
        ratio = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= size and 0 < h <= size:
            return int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w
    return 0, 0, size, size


def crops(
    pixels: np.ndarray, places: np.ndarray, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """(B, H, W, 3) uint8 and (B, 4) boxes -> (B, 3, H, W) float32, each box resized to the
    full size (bicubic, antialiased) and normalised like the model's preprocess."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    size = tuple(x.shape[-2:])
    out = [
        F.interpolate(
            x[i : i + 1, :, t : t + h, s : s + w],
            size=size,
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )
        if (h, w) != size
        else x[i : i + 1]
        for i, (t, s, h, w) in enumerate(places.tolist())
    ]
    x = torch.cat(out).clamp_(0, 1) if out else x
    return (x - mean) / std
