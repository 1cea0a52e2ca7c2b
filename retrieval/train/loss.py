"""Symmetric InfoNCE (CLIP's contrastive loss) with multi-positive targets. Pure tensors.

With one process, ``image`` and ``text`` (B, D) are the whole batch. With several, each process
passes its local rows and the all-gathered global rows (N, D) ("local loss" in open_clip's
terms): each local image is scored against every text of the global batch, and each local text
against every global image. The mean of the processes' losses is the one-process loss of the
global batch, so N processes of batch B train like one process of batch N*B.

Positives: pair ``i`` and pair ``j`` are positives of each other when they carry the same
caption text (``caption_ids`` equal), so a caption repeated in a batch is never a negative.
With distinct ids the loss is exactly open_clip's ``ClipLoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_mask(local_ids: torch.Tensor, global_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: local pair i and global pair j are positives of each other.

    ``*_ids``: (B,), (N,) int caption ids (equal: the same caption text), or (B, K), (N, K)
    with one id per column (caption, image): pairs equal in any column are positives, so
    two captions of one image in a batch are never each other's negatives.
    """
    same = local_ids[:, None] == global_ids[None, :]
    return same if same.ndim == 2 else same.any(dim=-1)


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j t_ij log softmax(logits)_ij, t = positives spread uniformly."""
    targets = positives.to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def clip_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    all_image: torch.Tensor | None = None,
    all_text: torch.Tensor | None = None,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of local unit features ``image``, ``text`` (B, D).

    ``all_image``, ``all_text``: (N, D) global features (default: the local ones);
    ``logit_scale``: the multiplier itself (already exponentiated), a scalar tensor;
    ``positives``: (B, N) bool, default: local pair i matches global pair i (offset 0).
    """
    all_image = image if all_image is None else all_image
    all_text = text if all_text is None else all_text
    logits_per_image = logit_scale * image @ all_text.T  # (B, N)
    logits_per_text = logit_scale * text @ all_image.T  # (B, N)
    if positives is None:
        labels = torch.arange(image.shape[0], device=image.device)
        return (
            F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
        ) / 2
    return (
        soft_cross_entropy(logits_per_image, positives)
        + soft_cross_entropy(logits_per_text, positives)
    ) / 2


def clamp_logit_scale(log_scale: torch.nn.Parameter, max_scale: float = 100.0) -> None:
    """Keep exp(log_scale) <= ``max_scale`` (CLIP's clamp, applied after every step)."""
    with torch.no_grad():
        log_scale.clamp_(0, torch.log(torch.tensor(max_scale)).item())


def itm_negatives(
    logits: torch.Tensor, positives: torch.Tensor, generator: torch.Generator, uniform: float = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives for image-text matching, drawn as ALBEF and BLIP draw them.

    ``logits`` (N, N): image i against text j (the contrastive logits of the whole batch);
    ``positives`` (N, N) bool: pairs that must never be negatives (the same caption text, the
    same image). Returns ``(text_for_image, image_for_text)``, each (N,) int64: for image i a
    text j drawn with probability softmax over its non-positive j of ``logits[i]`` (the ones the
    dual encoder finds most alike are drawn most), for text j an image likewise from column j;
    -1 where a row has no candidate at all. With probability ``uniform`` a row's draw is uniform
    over its non-positives instead (an easy negative). Drawn on the CPU from ``generator``.
    """
    masked = logits.detach().double().cpu().masked_fill(positives.cpu(), float("-inf"))
    flat = torch.zeros_like(masked).masked_fill(positives.cpu(), float("-inf"))
    return (
        _draw(masked, flat, uniform, generator),
        _draw(masked.T.contiguous(), flat.T.contiguous(), uniform, generator),
    )


def _draw(masked, flat, uniform: float, generator: torch.Generator) -> torch.Tensor:
    """One column per row of ``masked`` (N, C) by its softmax, or of ``flat`` (uniform over
    the same columns) for the rows a coin with ``uniform`` picks; -1 for a row without any."""
    out = torch.full((masked.shape[0],), -1, dtype=torch.int64)
    easy = torch.rand(masked.shape[0], generator=generator, dtype=torch.float64) < uniform
    chosen = torch.where(easy[:, None], flat, masked)
    has = torch.isfinite(chosen).any(dim=1)
    if has.any():
        weights = torch.softmax(chosen[has], dim=1)
        out[has] = torch.multinomial(weights, 1, generator=generator)[:, 0]
    return out


def itm_loss(positive: torch.Tensor, negative: torch.Tensor, total: int) -> torch.Tensor:
    """Binary cross-entropy of match logits, summed and divided by ``total`` (the number of
    pairs in the whole batch, so that processes' parts add up to the one-process mean):
    ``positive`` logits should say "match", ``negative`` logits "no match"."""
    pos = F.binary_cross_entropy_with_logits(
        positive.float(), torch.ones_like(positive, dtype=torch.float32), reduction="sum"
    )
    neg = F.binary_cross_entropy_with_logits(
        negative.float(), torch.zeros_like(negative, dtype=torch.float32), reduction="sum"
    )
    return (pos + neg) / max(total, 1)
