"""This process's place among the processes torchrun started (one, when it did not).

Training and encoding run on PyTorch's own distributed runtime: ``torchrun`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; the process group is NCCL on GPUs, gloo on CPUs.

A rank that fails must not leave the others waiting for it: PyTorch's own join and
collectives wait 30 minutes for a process that is gone or never came (a node whose corpus is
not mounted fails before it joins). So the ranks share the launch's key-value store (the one
torchrun's agent serves, or rank 0's without torchrun) and use it for two things: the join
counts arrivals and gives up at once when a rank has said it failed, and a watchdog thread in
every rank stops its process within a second of another rank's failure, with that rank's line.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import PeerFailedError

log = logging.getLogger(__name__)

JOIN_TIMEOUT = timedelta(minutes=30)  # PyTorch's own default for a rank that never comes
ANNOUNCE_TIMEOUT = timedelta(seconds=5)  # a failing rank does not hang on telling the others
WATCH_EVERY_S = 0.5


@dataclass(frozen=True)
class World:
    """This process's place among the processes: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1
    store: Any = field(default=None, compare=False, repr=False)  # the launch's dist.Store


def launched() -> bool:
    """Whether this process is one of several that torchrun (or a user) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str = "auto") -> tuple[World, str]:
    """This process's `World`, joining the process group under torchrun, and its device.

    Raises `PeerFailedError` with the failing rank's line when another rank failed first.
    """
    if not launched():
        return World(), device
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    world = World(rank, size, _store(rank, JOIN_TIMEOUT))
    if not dist.is_initialized():
        _arrive(world)
        backend = "nccl" if cuda else "gloo"
        group_store = dist.PrefixStore("group", world.store)
        dist.init_process_group(backend, store=group_store, rank=rank, world_size=size)
        stop = threading.Event()
        watch = threading.Thread(target=_watch, args=(world, stop), name="peer-watch", daemon=True)
        watch.start()
        # Stopped before the interpreter tears down: a thread still inside the store's C++
        # client at exit aborts the process ("terminate called without an active exception").
        atexit.register(_stop_watching, stop, watch)
    return world, (f"cuda:{local}" if cuda else "cpu")


def announce(message: str) -> str:
    """Tell the other ranks that this one failed with ``message``; the first failure's line.

    Returns this rank's own line when it is the first to fail, another rank's otherwise (its
    error caused this one, e.g. a collective that lost its peer). Best effort: a store that
    cannot be reached leaves the message as it is.
    """
    line = f"rank {os.environ.get('RANK', '?')} failed: {message}"
    try:
        store = _store(int(os.environ.get("RANK", "-1")), ANNOUNCE_TIMEOUT, host=False)
        return store.compare_set(_key("failed"), "", line).decode()
    except (RuntimeError, ValueError, KeyError) as e:  # no store, or no launch variables
        log.debug("could not tell the other ranks about the failure: %s", e)
        return line


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


def _key(name: str) -> str:
    # torchrun's agent may restart the workers; each attempt has its own keys
    return f"retrieval/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}"


def _store(rank: int, timeout: timedelta, host: bool = True) -> dist.Store:
    """The launch's store: torchrun's agent serves it; without torchrun, rank 0 does."""
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    serve = host and rank == 0 and not agent
    return dist.TCPStore(
        address, port, is_master=serve, timeout=timeout, wait_for_workers=False, multi_tenant=True
    )


def _arrive(world: World) -> None:
    """Wait for every rank to arrive, unless one says it failed first."""
    arrived, failed = _key("arrived"), _key("failed")
    world.store.add(arrived, 1)
    start = last_note = time.monotonic()
    while (count := world.store.add(arrived, 0)) < world.size:
        if world.store.check([failed]):
            raise PeerFailedError(world.store.get(failed).decode())
        now = time.monotonic()
        if now - start > JOIN_TIMEOUT.total_seconds():
            raise PeerFailedError(f"only {count} of {world.size} ranks arrived in {JOIN_TIMEOUT}")
        if now - last_note > 30:
            log.warning("waiting for the other ranks: %d of %d arrived", count, world.size)
            last_note = now
        time.sleep(0.1)


def _stop_watching(stop: threading.Event, watch: threading.Thread) -> None:
    stop.set()
    watch.join(timeout=5)


def _watch(world: World, stop: threading.Event) -> None:
    """Stop this process within a second of another rank's failure, with that rank's line.

    A rank stuck in a collective cannot be interrupted from Python, so this exits the process;
    whatever it was writing stays unpublished (builds and training resume with --resume).
    """
    failed = _key("failed")
    while not stop.wait(WATCH_EVERY_S):
        try:
            if not world.store.check([failed]):
                continue
            line = world.store.get(failed).decode()
        except RuntimeError:  # the store's host ended (rank 0 done): nothing left to watch
            return
        if line.startswith(f"rank {world.rank} "):
            return  # this rank's own failure: its error handler reports it
        sys.stderr.write(f"Error: stopped because {line}\n")
        sys.stderr.flush()
        os._exit(1)
