"""Training the re-ranker: image-text matching (ITM) beside the contrastive loss (``--itm``).

Each step, as ALBEF and BLIP do: the towers run once and give both the pooled embeddings (the
contrastive loss) and their token outputs (the re-ranker's input). For every image of the
global batch one text is drawn as its negative, and for every text one image, with probability
softmax of the contrastive logits over the pairs that are not positives
(`retrieval.train.loss.itm_negatives`): the pairs the dual encoder finds most alike, never one
with the same caption text or the same image. A share ``itm_random`` of them is drawn uniformly
instead: a new re-ranker on frozen towers given hard negatives only kept guessing the base rate
(measured, benchmarks/README.md), and easy ones teach it colours and shapes first. The re-ranker
then scores the B positives and the 2B negatives, and the ITM loss joins the contrastive one
with weight ``itm_weight``.

Under torchrun the features and tokens are all-gathered (tokens with their gradients), every
process draws the same negatives for the whole global batch from a generator seeded by (seed,
step) and scores its own rows, and each process's loss is its share of the global sum: N
processes of batch B train like one of batch N*B. With both towers locked only the re-ranker
(and the logit scale) learn: the dual encoder's embeddings stay as they were.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TrainError
from ..model import reranker as rr
from ..model.distributed import World
from ..model.spec import RerankerConfig
from ..model.tokens import image_tokens, text_tokens
from .gradcache import _gather, _gather_with_grad, batch_loss
from .loss import itm_loss, itm_negatives, positive_mask

log = logging.getLogger(__name__)


class ItmModel(nn.Module):
    """The dual encoder (``clip``, open_clip's) and its re-ranker, as one module for DDP: its
    forward is the whole step but the contrastive loss."""

    def __init__(
        self, clip: nn.Module, reranker: rr.Reranker, world: World, uniform: float = 0.0
    ) -> None:
        super().__init__()
        self.clip, self.reranker, self.world = clip, reranker, world
        self.uniform = uniform  # share of negatives drawn uniformly (easy ones)

    def forward(self, images, tokens, ids, generator: torch.Generator):
        """-> (image features (B, E), text features (B, E), unit; logit scale; ITM loss)."""
        img_pooled, patches = image_tokens(self.clip, images)
        txt_pooled, states, mask = text_tokens(self.clip, tokens)
        img, txt = F.normalize(img_pooled, dim=-1), F.normalize(txt_pooled, dim=-1)
        scale = self.clip.logit_scale.exp()
        world, b = self.world, len(images)
        with torch.no_grad():
            all_ids = _gather(ids, world)
            logits = scale * _gather(img, world) @ _gather(txt, world).T
            positives = positive_mask(all_ids, all_ids)
            neg_text, neg_image = itm_negatives(logits, positives, generator, self.uniform)
        mine = slice(world.rank * b, (world.rank + 1) * b)
        neg_text, neg_image = neg_text[mine], neg_image[mine]
        all_patches = _gather_with_grad(patches, world)
        all_states, all_mask = _gather_with_grad(states, world), _gather(mask, world)
        ti, it = (neg_text >= 0).nonzero()[:, 0], (neg_image >= 0).nonzero()[:, 0]
        to_device = patches.device
        nt, ni = neg_text[ti].to(to_device), neg_image[it].to(to_device)
        ti, it = ti.to(to_device), it.to(to_device)
        positive = self.reranker(states, mask, patches)
        negative = torch.cat([
            self.reranker(all_states[nt], all_mask[nt], patches[ti]),
            self.reranker(states[it], mask[it], all_patches[ni]),
        ])  # fmt: skip
        total = _pairs(positive_mask(all_ids, all_ids))
        loss = itm_loss(positive, negative, total) * world.size
        return img, txt, scale, loss


def _pairs(positives: torch.Tensor) -> int:
    """Pairs the ITM loss counts over the global batch (``positives`` (N, N)): the N positives
    and one negative per image and per text that has a candidate."""
    free = ~positives
    return len(positives) + int(free.any(dim=1).sum()) + int(free.any(dim=0).sum())


def itm_step(ddp: nn.Module, batch, world: World, amp, weight: float, draw: int) -> float:
    """Forward and backward of one ``--itm`` batch (images, tokens, ids); its loss.

    ``ddp``: an `ItmModel`, maybe DDP-wrapped; ``amp``: (autocast, scale_loss); ``draw``: the
    negatives' seed, the same on every process (from the run's seed and the step).
    """
    autocast, scale_loss = amp
    images, tokens, ids = batch
    generator = torch.Generator().manual_seed(draw)
    with autocast():
        img, txt, scale, itm = ddp(images, tokens, ids, generator)
    loss = batch_loss(img, txt, scale, ids, world) + weight * itm
    scale_loss(loss).backward()
    return loss.item()


def reranker_for(encoder, config) -> rr.Reranker:
    """The re-ranker ``--itm`` trains (``config``: a TrainConfig): the one saved with the
    starting weights, else a new one."""
    if config.chunk_size or config.accum_steps > 1:
        raise TrainError(
            "--itm trains on whole batches: leave out --chunk-size and --accum-steps (gradient "
            "caching would re-embed every negative's tokens)"
        )
    saved = rr.load(encoder.spec.checkpoint, encoder.model)
    if saved is not None:
        log.info("--itm: training on the re-ranker saved with %s", encoder.spec.checkpoint)
        return saved.train()
    return new_reranker(encoder.model, encoder.tokenizer, config.reranker)


def new_reranker(model: nn.Module, tokenizer, config: RerankerConfig) -> rr.Reranker:
    """A fresh re-ranker sized to ``model``'s towers (one tiny forward pass measures them)."""
    size = model.visual.image_size
    h, w = (size, size) if isinstance(size, int) else size
    device = next(model.parameters()).device
    with torch.no_grad():
        _, patches = image_tokens(model, torch.zeros(1, 3, h, w, device=device))
        tokens = tokenizer([""]).to(device)
        _, states, _ = text_tokens(model, tokens)
    context = int(getattr(tokenizer, "context_length", tokens.shape[1]))
    shapes = rr.Shapes(states.shape[-1], patches.shape[-1], patches.shape[1], context)
    return rr.Reranker(config, shapes).to(device)


@torch.no_grad()
def itm_recall(model, reranker: rr.Reranker, val_set, device, top: int = 10) -> dict[str, float]:
    """Text->image Recall@1/5 of the validation set once the re-ranker re-orders each caption's
    ``top`` nearest images (exact search); a caption whose image is not among them misses."""
    was = model.training, reranker.training
    model.eval(), reranker.eval()
    images, patches = _encoded(val_set, "image", lambda x: image_tokens(model, x.to(device)))
    texts, states = _encoded(val_set, "text", lambda x: text_tokens(model, x.to(device)))
    model.train(was[0])
    sims = F.normalize(texts[0], dim=-1) @ F.normalize(images[0], dim=-1).T
    cand = sims.topk(min(top, sims.shape[1]), dim=1).indices  # (C, top)
    owner = torch.as_tensor(val_set.caption_owner(), device=cand.device)
    hit = []
    for c in range(len(cand)):
        logits = reranker(
            states[0][c : c + 1].expand(cand.shape[1], -1, -1),
            states[1][c : c + 1].expand(cand.shape[1], -1),
            patches[cand[c]],
        )
        order = cand[c][torch.argsort(logits, descending=True, stable=True)]
        hit.append((order == owner[c]).nonzero()[:, 0])
    reranker.train(was[1])
    ranks = torch.tensor([int(h[0]) if len(h) else top for h in hit])
    return {
        f"val_itm_image_retrieval_recall@{k}": round(float((ranks < k).float().mean()), 4)
        for k in (1, 5)
    }


def _encoded(val_set, kind: str, run, batch: int = 256):
    """Pooled features and token outputs of every validation image or caption, in order."""
    n = len(val_set) if kind == "image" else len(val_set.tokens)
    parts = [run(val_set._inputs(kind, slice(s, s + batch), None)) for s in range(0, n, batch)]
    pooled = torch.cat([p[0] for p in parts]).float()
    if kind == "image":
        return (pooled,), torch.cat([p[1] for p in parts])
    return (pooled,), (torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))
