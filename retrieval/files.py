"""Durable file writes and digests: the one way the engine replaces a file on disk.

`atomic_path` / `atomic_write` give a temporary name beside the target; on success the data is
fsynced, renamed over the target (atomic on POSIX) and the folder fsynced, so after a crash or
a power cut the target is the old file or the new one, whole, never a torn mix. Checkpoints,
manifests, spool shards and the training pixel cache are all written through it. Temporary
names end in ``.tmp`` so that cleaners can recognise leftovers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to fill; on success it replaces ``path`` durably.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        fsync_file(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "wb", **open_args: Any) -> Iterator[IO]:
    """Open a file object that replaces ``path`` durably when the block ends without error."""
    with atomic_path(path) as tmp, tmp.open(mode, **open_args) as f:
        yield f


def fsync_file(path: Path) -> None:
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path) -> dict | None:
    """``{"size", "mtime_ns", "sha256"}`` of a regular file, None for anything else (a tar
    member's reference, a missing file): what `retrieval sync` compares to notice an edit."""
    try:
        st = Path(path).stat()
    except (OSError, ValueError):
        return None
    if not Path(path).is_file():
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}
