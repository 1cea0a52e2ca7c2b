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
from . import pixel_cache


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

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, items: np.ndarray, draws: np.ndarray, device) -> tuple:
        """Images (B, 3, H, W), tokens (B, L) and caption ids (B,) for items ``items``.

        ``draws`` (N,) in [0, 1): which caption each item shows this epoch.
        """
        order = np.argsort(self.rows[items], kind="stable")  # memmap reads in file order
        items = items[order]
        caps = np.array(
            [
                r[int(d * len(r))]
                for r, d in zip((self.caption_rows[i] for i in items), draws[items], strict=True)
            ]
        )
        images = pixel_cache.to_model_input(self.pixels[self.rows[items]], self.mean, self.std)
        return (images.to(device), self.tokens[caps].to(device), self.caption_ids[caps].to(device))

    @torch.no_grad()
    def evaluate(self, model, device, batch: int = 256) -> dict[str, float]:
        """Recall@1/5/10 both ways over every image and every caption (exact search)."""
        was_training = model.training
        model.eval()
        img = [
            model.encode_image(
                pixel_cache.to_model_input(
                    self.pixels[self.rows[s : s + batch]], self.mean, self.std
                ).to(device),
                normalize=True,
            )
            .float()
            .cpu()
            for s in range(0, len(self.rows), batch)
        ]
        txt = [
            model.encode_text(self.tokens[s : s + batch].to(device), normalize=True).float().cpu()
            for s in range(0, len(self.tokens), batch)
        ]
        model.train(was_training)
        owner = np.concatenate([np.full(len(r), i) for i, r in enumerate(self.caption_rows)])
        order = np.concatenate(self.caption_rows)
        text_to_image = np.empty(len(order), dtype=np.int64)
        text_to_image[order] = owner
        m = retrieval_metrics(torch.cat(img).numpy(), torch.cat(txt).numpy(), text_to_image)
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
    `retrieval.train.loop.epoch_batches`); an item without the field is a group of its own.
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
    )


def _image_size(encoder) -> int:
    size = encoder.model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)
