"""One writer at a time for a Milvus-backed index, across machines: the ``lock`` row.

Milvus has no compare-and-set, so a writer takes the lock by writing the row (owner, time) and
reading it back after `LOCK_SETTLE_S`, longer than a Strong read: of two racing writers the
last one wins and both know it. The owner refreshes the row every `HEARTBEAT_S` while the lock
is still its own; a lock whose owner died is taken over at once on its own host, and after
`STALE_S` without a heartbeat elsewhere. milvus-lite admits one process, which is its lock.
Each commit also re-checks the state (`retrieval.index.milvus.writer`), a second line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from ...errors import IndexBusyError
from . import collections as coll
from .client import guard

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 60.0
LOCK_SETTLE_S = 1.0  # a lock written is read back after this (longer than a Strong read)


@contextlib.contextmanager
def lock(client, names: coll.Names, wait: float = 0.0, lite: bool = False) -> Iterator[None]:
    """The one-writer lock of index ``names``, held across machines while the body runs.

    ``lite``: milvus-lite lets one process open its file at a time, which is the lock.
    """
    with guard("taking the index's lock"):
        coll.create_meta(client, names)
    if lite:
        with guard("changing the index"):
            yield
        return
    me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _take(client, names, me, wait)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(client, names, me, stop), daemon=True)
    beat.start()
    try:
        with guard("holding the lock"):
            yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(Exception):  # the server gone: the lock goes stale
            if (coll.read_row(client, names, "lock") or {}).get("owner") == me:
                coll.delete_row(client, names, "lock")


def _take(client, names: coll.Names, me: str, wait: float) -> None:
    """Take the lock as ``me``, waiting up to ``wait`` seconds for its holder."""
    deadline, told = time.monotonic() + wait, False
    while not _locked(client, names, me):
        if time.monotonic() >= deadline:
            raise IndexBusyError(
                f"index collections {names.base} are being changed by {_owner(client, names)}; "
                "wait for it, or retry with --wait SECONDS"
            )
        if not told:  # said once, as the FAISS backend's lock says it: waiting, not hung
            owner = _owner(client, names)
            log.warning("waiting up to %gs: %s is changing %s", wait, owner, names.base)
            told = True
        time.sleep(0.5)


def _owner(client, names: coll.Names) -> str:
    with guard("reading the index's lock"):
        return (coll.read_row(client, names, "lock") or {}).get("owner", "?")


def _locked(client, names: coll.Names, me: str) -> bool:
    with guard("taking the index's lock"):
        return _try_lock(client, names, me)


def _try_lock(client, names: coll.Names, me: str) -> bool:
    held = coll.read_row(client, names, "lock")
    if held and held["owner"] != me and time.time() - held["at"] < STALE_S and _alive(held):
        return False
    if held and held["owner"] != me:
        log.warning("taking over the lock of %s, left by %s", names.base, held["owner"])
    coll.write_row(client, names, "lock", {"owner": me, "at": time.time()})
    time.sleep(LOCK_SETTLE_S)  # no compare-and-set in Milvus: the last of racing writers wins...
    return (coll.read_row(client, names, "lock") or {}).get("owner") == me  # ...and knows it


def _alive(held: dict) -> bool:
    """Whether the lock's owner may still run: a process on this host is asked directly; on
    another host, only its heartbeat tells (a lock older than STALE_S is taken over)."""
    host, pid, _ = held["owner"].rsplit(":", 2)
    if host != socket.gethostname():
        return True
    if pid == str(os.getpid()):  # an earlier change of this process that could not let go
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):  # another user's process, or not ours to judge
        return True
    return True


def _heartbeat(client, names: coll.Names, me: str, stop: threading.Event) -> None:
    """Keep the lock fresh while it is still ours (a writer that lost it stops beating; its
    commit then finds the state moved, see `_commit`)."""
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(Exception):
            if (coll.read_row(client, names, "lock") or {}).get("owner") != me:
                log.error("lost the lock of %s to another writer", names.base)
                return
            coll.write_row(client, names, "lock", {"owner": me, "at": time.time()})
