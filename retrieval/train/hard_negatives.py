"""Hard-negative batches (``--hard-negatives N``): confusable pairs made to share a batch.

A contrastive batch drawn at random rarely holds two pairs the model confuses, so it learns
little from most of its negatives. Every ``N`` epochs (from the first) the current model embeds
every training image, FAISS finds each one's nearest neighbours among them (exact inner
product), and the images are cut into groups of `GROUP` neighbours: a random image starts a
group and takes its nearest images not yet placed. The groups then play the part of
``--batch-group``'s (`retrieval.train.sampling.epoch_batches` lays each group out together),
so each batch is made of a few such neighbourhoods.

The groups of refresh epoch ``e`` are kept in the run folder (``hard_negatives/epoch_E.npy``):
a resumed run uses the ones its epoch was trained with, and a refresh epoch run again mines
from the same weights, so it finds the same groups.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist

from ..files import atomic_write
from ..model.distributed import World

log = logging.getLogger(__name__)

GROUP = 8  # images per neighbourhood
FOLDER = "hard_negatives"


def refresh_epoch(epoch: int, every: int) -> int:
    """The epoch whose groups epoch ``epoch`` trains with: the last refresh at or before it."""
    return 1 + (epoch - 1) // every * every


def groups_for(model, data, out: Path, when: tuple[int, int], world: World) -> np.ndarray:
    """(N,) int64 group of each training item for epoch ``when[0]`` (refreshed every
    ``when[1]``): mined on a refresh epoch (by rank 0, sent to the others), else read back.
    ``data``: the train set and its cached tower features (or None)."""
    (train_set, features), (epoch, every) = data, when
    at = refresh_epoch(epoch, every)
    path = out / FOLDER / f"epoch_{at}.npy"
    groups = None
    if world.rank == 0:  # rank 0 decides, loads or mines; every rank gets its answer
        groups = np.load(path) if at != epoch and path.is_file() else None
        if groups is None:
            seed = int(np.random.default_rng([at, 77]).integers(2**31))
            groups = neighbourhoods(neighbours(model, train_set, features), GROUP, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as f:
                np.save(f, groups)
            log.info("epoch %d: batches from %d neighbourhoods", epoch, int(groups.max()) + 1)
    if world.size > 1:
        device = next(model.parameters()).device
        shared = torch.as_tensor(groups if groups is not None else np.zeros(len(train_set)))
        shared = shared.to(device, torch.int64)
        dist.broadcast(shared, src=0)
        groups = shared.cpu().numpy()
    return groups


@torch.no_grad()
def neighbours(model, train_set, features, k: int = GROUP, batch: int = 256) -> np.ndarray:
    """(N, k) nearest other training images of each, by the model's image embeddings."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = [
        model.encode_image(
            train_set._inputs("image", slice(s, s + batch), features).to(device), normalize=True
        )
        .float()
        .cpu()
        for s in range(0, len(train_set), batch)
    ]
    model.train(was)
    emb = np.ascontiguousarray(torch.cat(parts).numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    _, ids = index.search(emb, min(k + 1, len(emb)))
    return np.array([[j for j in row if j != i][:k] for i, row in enumerate(ids)], dtype=np.int64)


def neighbourhoods(near: np.ndarray, size: int, seed: int) -> np.ndarray:
    """(N,) group codes: in a random order each item not yet placed starts a group and takes
    its nearest neighbours (``near`` (N, k), nearest first) not yet placed, up to ``size``."""
    n = len(near)
    group = np.full(n, -1, dtype=np.int64)
    code = 0
    for i in np.random.default_rng(seed).permutation(n):
        if group[i] >= 0:
            continue
        group[i] = code
        taken = 1
        for j in near[i]:
            if taken == size:
                break
            if j >= 0 and group[j] < 0:
                group[j] = code
                taken += 1
        code += 1
    return group
