"""This process's place among the processes torchrun started (one, when it did not).

Training and encoding run on PyTorch's own distributed runtime: ``torchrun`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; the process group is NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the processes: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1


def join(device: str = "auto") -> tuple[World, str]:
    """This process's `World`, joining the process group under torchrun, and its device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank, size), (f"cuda:{local}" if cuda else "cpu")


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def from_rank0(world: World, value: Any) -> Any:
    """Rank 0's ``value``, on every rank (picklable values only)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
