"""`retrieval bench --rerank N`: ranks once the re-ranker re-orders a first stage's top N.

For every query the first stage (exact cosine, or a fused strategy) ranks the whole dataset;
its top N are scored by the re-ranker (`retrieval.model.reranker`) and re-ordered, the rest keep
their places (`retrieval.scoring.metrics.reranked_ranks`). The re-ranker's inputs are computed
once for the whole dataset: every image's patch tokens and every caption's token states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import RetrievalError
from ..model.encoder import Encoder
from ..model.reranker import Reranker
from ..scoring import metrics

_CHUNK = 128  # queries at a time
_PAIRS = 1024  # pairs through the re-ranker at a time


@dataclass
class Inputs:
    """The re-ranker and its inputs for a dataset: ``patches`` (I, P, W) of each image,
    ``states`` (T, L, W) and ``masks`` (T, L) of each caption (padding masked)."""

    reranker: Reranker
    patches: torch.Tensor
    states: torch.Tensor
    masks: torch.Tensor

    @classmethod
    def of(cls, reranker: Reranker, encoder: Encoder, images: Sequence[Path], texts, config):
        """Encode ``images`` (their patches; or ``images`` is already them, (I, P, W) fp16,
        from the pass that embedded them) and ``texts`` (their states) with ``encoder``."""
        if isinstance(images, np.ndarray):
            patches = torch.from_numpy(images)
        else:
            pieces: list[np.ndarray] = []
            _, _, failures = encoder.encode_image_files(
                list(images), config.batch_size, config.workers, patches=pieces
            )
            if failures:  # the dataset's images were read a moment ago
                raise RetrievalError(f"{len(failures)} dataset images became unreadable meanwhile")
            patches = torch.from_numpy(np.concatenate(pieces))
        parts = [encoder.text_states(texts[s : s + 256]) for s in range(0, len(texts), 256)]
        length = max(p[0].shape[1] for p in parts)  # a tower tokenizer cuts each batch apart
        states = torch.cat([_pad(p[0], length) for p in parts])
        masks = torch.cat([_pad(p[1], length) for p in parts])
        return cls(reranker, patches, states, masks)

    @torch.inference_mode()
    def logits(self, texts: np.ndarray, images: np.ndarray) -> np.ndarray:
        """(M,) match logits of caption ``texts[m]`` with image ``images[m]``."""
        device = next(self.reranker.parameters()).device
        out = []
        for s in range(0, len(texts), _PAIRS):
            t, i = texts[s : s + _PAIRS], images[s : s + _PAIRS]
            got = self.reranker(
                self.states[t].to(device), self.masks[t].to(device), self.patches[i].to(device)
            )
            out.append(got.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    extra = length - x.shape[1]
    if not extra:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], dim=1)


def text_to_image(
    inputs: Inputs, n: int, scores: Callable[[np.ndarray], np.ndarray], correct
) -> np.ndarray:
    """(T,) text->image ranks after re-ranking: ``scores(rows)`` (R, I) is the first stage for
    caption ``rows``; ``correct(rows)`` (R, I) bool which images count as right."""
    total = len(inputs.states)
    ranks = []
    for s in range(0, total, _CHUNK):
        rows = np.arange(s, min(s + _CHUNK, total))
        first, right = scores(rows), correct(rows)
        cand = metrics.top_candidates(first, right, n)
        texts = np.repeat(rows, cand.shape[1])
        logits = inputs.logits(texts, cand.reshape(-1)).reshape(cand.shape)
        ranks.append(metrics.reranked_ranks(first, right, cand, logits))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def image_to_text(inputs: Inputs, n: int, image: np.ndarray, text: np.ndarray, owner) -> np.ndarray:
    """(I',) image->text ranks after re-ranking exact cosine's top ``n`` captions, for the
    images with at least one caption (as `retrieval.scoring.metrics.retrieval_ranks`)."""
    captioned = np.flatnonzero(np.bincount(owner, minlength=len(image)) > 0)
    ranks = []
    for s in range(0, len(captioned), _CHUNK):
        rows = captioned[s : s + _CHUNK]
        first = image[rows] @ text.T
        correct = owner[None, :] == rows[:, None]
        cand = metrics.top_candidates(first, correct, n)
        images = np.repeat(rows, cand.shape[1])
        logits = inputs.logits(cand.reshape(-1), images).reshape(cand.shape)
        ranks.append(metrics.reranked_ranks(first, correct, cand, logits))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
