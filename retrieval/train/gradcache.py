"""One contrastive step, across processes and in chunks: gradient caching.

A contrastive loss wants large batches, and a batch of 2048 image-text pairs does not fit where
64 do. Gradient caching (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", 2021) gets the exact gradient of the big batch with the memory of a chunk:

1. embed the whole batch without gradients, chunk by chunk;
2. compute the loss on all features (features as leaves) and its gradient w.r.t. each feature;
3. re-embed chunk by chunk with gradients and back-propagate the cached feature gradients.

With several processes (torchrun), features are all-gathered with gradients and each process
computes the local loss against the global features, as open_clip does; DDP's gradient average
then yields the gradient of the one-process loss over the global batch.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..model.distributed import World
from .loss import clip_loss, positive_mask


def _gather_with_grad(x: torch.Tensor, world: World) -> torch.Tensor:
    if world.size == 1:
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """(B, D) per process -> (world * B, D), rank order; gradients flow back to each part.

    torch.distributed.nn.functional.all_gather does this but is deprecated (it warns on every
    step) in favour of a private module; every process has the same B here.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every process's loss reads every part: this part's gradient is their sum. A copy:
        # autograd may hand the same tensor to other consumers.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def _gather(x: torch.Tensor, world: World) -> torch.Tensor:
    if world.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def batch_loss(img, txt, scale, caption_ids: torch.Tensor, world: World) -> torch.Tensor:
    """The local loss of this process's (B, D) features against the global batch."""
    all_img, all_txt = _gather_with_grad(img, world), _gather_with_grad(txt, world)
    positives = positive_mask(caption_ids, _gather(caption_ids, world))
    return clip_loss(
        img.float(), txt.float(), scale.float(), all_img.float(), all_txt.float(), positives
    )


def _forward(model, images, tokens):
    out = model(images, tokens)  # open_clip: (image features, text features, logit scale, ...)
    return out[0], out[1], out[2]


def contrastive_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    caption_ids: torch.Tensor,
    chunk: int | None = None,
    world: World | None = None,
    autocast=contextlib.nullcontext,
    scale_loss=lambda loss: loss,
) -> float:
    """Forward and backward of one batch; gradients accumulate in the parameters.

    ``images`` (B, 3, H, W), ``tokens`` (B, L), ``caption_ids`` (B,) int64 (equal ids = same
    caption text) or (B, K) (see `retrieval.train.loss.positive_mask`). ``chunk``: embed at
    most this many pairs at once (None: the whole batch). ``model`` may be wrapped in
    DistributedDataParallel. Returns the loss value.
    """
    world = world or World()
    n = images.shape[0]
    if chunk is None or chunk >= n:
        with autocast():
            img, txt, scale = _forward(model, images, tokens)
        loss = batch_loss(img, txt, scale, caption_ids, world)
        scale_loss(loss).backward()
        return loss.item()
    spans = [slice(s, s + chunk) for s in range(0, n, chunk)]
    with torch.no_grad(), autocast():
        parts = [_forward(model, images[s], tokens[s]) for s in spans]
    img = torch.cat([p[0] for p in parts]).float().requires_grad_()
    txt = torch.cat([p[1] for p in parts]).float().requires_grad_()
    scale = parts[0][2].detach().float().requires_grad_()
    loss = batch_loss(img, txt, scale, caption_ids, world)
    scale_loss(loss).backward()
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    for k, s in enumerate(spans):
        last = k == len(spans) - 1
        # Only the last chunk's backward all-reduces gradients across processes.
        with contextlib.nullcontext() if last else no_sync():
            with autocast():
                ci, ct, cs = _forward(model, images[s], tokens[s])
            g_scale = scale.grad if last else torch.zeros_like(scale.grad)
            torch.autograd.backward(
                [ci.float(), ct.float(), cs.float()],
                [img.grad[s], txt.grad[s], g_scale],
            )
    return loss.item()
