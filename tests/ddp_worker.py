"""Run under torchrun by tests/test_train.py: one contrastive step of a DDP-wrapped model.

Each of the N processes takes its slice of a fixed global batch; rank 0 writes the mean of the
local losses and the (DDP-averaged) gradients to OUT, for comparison with one process. With
chunk -1, the step is an ``--itm`` step (contrastive + image-text matching with its re-ranker).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist

from retrieval.model.distributed import World
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec, RerankerConfig
from retrieval.train.gradcache import contrastive_step
from retrieval.train.itm import ItmModel, itm_step, new_reranker

ITM = -1  # the chunk argument that asks for an --itm step
ITM_DRAW = 1234  # the negatives' seed


def itm_model(config: str, world: World) -> ItmModel:
    """The micro model with a re-ranker, both from fixed seeds (the same in every process)."""
    encoder = Encoder.load(ModelSpec(config, random_init=True), device="cpu")
    torch.manual_seed(5)
    reranker = new_reranker(encoder.model, encoder.tokenizer, RerankerConfig(32, 1, 2))
    return ItmModel(encoder.model.train(), reranker.train(), world)


def global_batch(encoder: Encoder, n: int):
    g = torch.Generator().manual_seed(7)
    images = torch.randn(n, 3, 32, 32, generator=g)
    words = ["red", "blue", "circle", "square", "left", "above"]
    texts = [" ".join(words[(i * k) % 6] for k in range(1, 4)) for i in range(n)]
    texts[3] = texts[0]  # a repeated caption: a positive, across the two processes' slices
    ids = torch.tensor([texts.index(t) for t in texts])
    return images, encoder.tokenizer(texts), ids


def main(config: str, out: str, chunk: int) -> None:
    dist.init_process_group("gloo")
    world = World(dist.get_rank(), dist.get_world_size())
    if chunk == ITM:
        model = itm_model(config, world)
    else:
        model = Encoder.load(ModelSpec(config, random_init=True), device="cpu").model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    images, tokens, ids = global_batch(
        Encoder.load(ModelSpec(config, random_init=True), device="cpu"), 12
    )
    per = 12 // world.size
    s = slice(world.rank * per, (world.rank + 1) * per)
    if chunk == ITM:
        batch = images[s], tokens[s], ids[s]
        loss = itm_step(ddp, batch, world, (contextlib.nullcontext, lambda x: x), 1.0, ITM_DRAW)
    else:
        loss = contrastive_step(ddp, images[s], tokens[s], ids[s], chunk or None, world)
    losses = [None] * world.size
    dist.all_gather_object(losses, loss)
    if world.rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": sum(losses) / world.size, "grads": grads}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
