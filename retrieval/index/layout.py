"""The on-disk layout of an index folder, its manifest, and atomic publication.

``<index_dir>/<name>`` is a symbolic link to ``<index_dir>/.versions/<name>/<version>/``, the
folder that holds the files. A build writes a new version folder, writes ``manifest.json`` last,
then swaps the link with one ``rename`` (atomic on POSIX): a reader resolves the link once and
sees the previous index or the new one, never a half-written one. The previous version is kept
so that readers still holding it finish their work; older ones are removed.

Writers (build, add, remove, compact) take ``<index_dir>/.locks/<name>.lock`` (`writer_lock`)
for their whole run, so two never interleave; readers take no lock and are never blocked. A
version folder without a manifest is a writer that died: the next writer deletes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import resource
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..errors import DiskFullError, IndexBusyError, SearchError
from ..files import fsync_dir, sha256_file
from .manifest import MANIFEST, Manifest, read_manifest, write_manifest

log = logging.getLogger(__name__)

ENV_INDEX_DIR = "RETRIEVAL_INDEX_DIR"
DEFAULT_INDEX_DIR = Path("indexes")

STORE = "meta.lmdb"
EMBEDDINGS = "embeddings"
SKIPPED = "skipped.jsonl"
_LOW_SPACE = 64 << 20  # bytes free below which an I/O error is taken for a full disk

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def index_root(index_dir: str | Path | None = None) -> Path:
    """``index_dir``, else $RETRIEVAL_INDEX_DIR, else ``indexes/`` in the working folder."""
    if index_dir is not None:
        return Path(index_dir).expanduser()
    return Path(os.environ.get(ENV_INDEX_DIR) or DEFAULT_INDEX_DIR).expanduser()


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(
            f"bad index name {name!r}: use letters, digits, '.', '_' or '-' (not first), "
            "at most 128 characters"
        )
    return name


def new_version(root: Path, name: str) -> Path:
    """A fresh, empty version folder for ``name`` to build into (not yet visible to readers)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    path = root / ".versions" / check_name(name) / f"{stamp}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


@contextlib.contextmanager
def writer_lock(root: Path, name: str, wait: float = 0.0):
    """Hold the write lock of index ``name`` (waiting up to ``wait`` seconds), then clean up.

    The lock is an ``flock`` on a file, so the kernel releases it when its holder dies, even
    by SIGKILL. Under the lock, version folders without a manifest are dead writers' leftovers.
    """
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{check_name(name)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, told = time.monotonic() + wait, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() < deadline and not told:
                    log.warning("waiting up to %gs: pid %s is changing %r", wait, holder, name)
                    told = True
                if time.monotonic() >= deadline:
                    raise IndexBusyError(
                        f"index {name!r} is being changed by another process (pid {holder}); "
                        "try again when it finishes, or pass --wait SECONDS"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _remove_unfinished(root, name)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def _remove_unfinished(root: Path, name: str) -> None:
    versions = root / ".versions" / name
    link = root / name
    published = link.resolve() if link.is_symlink() else None
    if versions.is_dir():
        for old in versions.iterdir():
            # The published version is never a leftover: without its manifest it is damaged,
            # and `verify --rollback` (or a rebuild) replaces it, not a writer's clean-up.
            if not (old / MANIFEST).exists() and old.resolve() != published:
                shutil.rmtree(old, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``: the version is on disk before publishing."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def link_or_copy(src: Path, dst: Path) -> None:
    """Share an immutable file between versions (hard link), or copy it where links fail."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def disk_full(e: BaseException, where: Path) -> bool:
    """Whether ``e`` says the disk or a file-size limit under ``where`` ran out.

    numpy and Python raise ENOSPC / EFBIG; FAISS passes the C library's text on; LMDB reports
    a short write as a bare I/O error, so for that one the disk itself is asked.
    """
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(e)
    if any(s in text for s in ("No space left", "File too large", "Disk quota")):
        return True
    return "Input/output error" in text and _short_of_space(where)


def _short_of_space(where: Path) -> bool:
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return True
    try:
        st = os.statvfs(where)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _LOW_SPACE


def disk_full_error(what: str, e: BaseException, hint: str = "") -> DiskFullError:
    detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return DiskFullError(
        f"out of disk space (or over the file-size limit) while {what} ({detail}); nothing "
        f"was published, the previous index is intact{'; ' + hint if hint else ''}"
    )


@contextlib.contextmanager
def disk_guard(root: Path, what: str, hint: str = ""):
    """Turn a full disk under ``root``, however FAISS, LMDB or numpy say so, into a
    `DiskFullError`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if disk_full(e, root):
            raise disk_full_error(what, e, hint) from None
        raise


def spool_dir(root: Path, name: str) -> Path:
    """Where a build or an add of ``name`` spools its embeddings until they are published."""
    return root / ".spool" / check_name(name)


def commit(root: Path, name: str, fill: Callable[[Path], Manifest]) -> Path:
    """Write a new version of ``name`` with ``fill(folder) -> manifest`` and publish it.

    Every file is fsynced and checksummed into the manifest, which is written last; then the
    link is swapped. Whatever fails before the swap (a full disk included) leaves the published
    version as it was and removes the half-written one. Call under `writer_lock`.
    """
    root.mkdir(parents=True, exist_ok=True)
    folder = new_version(root, name)
    try:
        manifest = fill(folder)
        # Readers open a version's LMDB without locking (it never changes once published), but
        # py-lmdb >= 3 still registers lock.mdb's inode as theirs; once the version is pruned
        # that inode is free, and a new file that reuses it would be refused as "already open
        # in this process". A published version has no writer, so it needs no lock file.
        (folder / STORE / "lock.mdb").unlink(missing_ok=True)
        sync_tree(folder)
        digests = checksums(folder, root / name)
        sizes = {rel: (folder / rel).stat().st_size for rel in digests}
        manifest = replace(manifest, sha256=digests, sizes=sizes)
        write_manifest(folder, manifest)
        return publish(folder, root, name)
    except BaseException as e:
        shutil.rmtree(folder, ignore_errors=True)
        if disk_full(e, root):
            raise disk_full_error(f"writing index {name!r}", e) from None
        raise


def checksums(folder: Path, previous: Path | None = None) -> dict[str, str]:
    """sha256 of every file of a version but the manifest and LMDB's lock file.

    Files hard-linked from the ``previous`` version keep the digest its manifest recorded.
    """
    known: dict[str, str] = {}
    if previous is not None and (previous / MANIFEST).is_file():
        known = read_manifest(previous).sha256
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name in (MANIFEST, "lock.mdb") or p.suffix == ".tmp":
            continue
        rel = p.relative_to(folder).as_posix()
        old = previous / rel if previous is not None else None
        same = rel in known and old is not None and old.exists() and old.samefile(p)
        out[rel] = known[rel] if same else sha256_file(p)
    return out


def publish(version: Path, root: Path, name: str) -> Path:
    """Point ``root/name`` at ``version`` atomically and prune versions no reader can reach."""
    link = root / name
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not an index published by this engine")
    previous = link.resolve() if link.is_symlink() else None
    tmp = root / f".{name}.{uuid.uuid4().hex}.link"
    tmp.symlink_to(version.relative_to(root))
    tmp.replace(link)  # rename(2): the swap readers observe
    fsync_dir(root)
    keep = {version.resolve(), previous}
    for old in (root / ".versions" / name).iterdir():
        # A folder without a manifest may be another build still running; leave it a day.
        stale = (old / MANIFEST).exists() or time.time() - old.stat().st_mtime > 86400
        if old.resolve() not in keep and stale:
            shutil.rmtree(old, ignore_errors=True)
    return link


def resolve(name: str, index_dir: str | Path | None = None) -> Path:
    """The version folder that ``name`` points to now; raise `SearchError` if there is none."""
    root = index_root(index_dir)
    link = root / check_name(name)
    if not (link / MANIFEST).is_file():
        known = ", ".join(list_indexes(root)) or "none"
        raise SearchError(f"no index named {name!r} in {root} (indexes there: {known})")
    return link.resolve()


def list_indexes(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(
        p.name for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()
    )


def root_of(version: Path) -> Path:
    """The index root that version folder ``version`` (``<root>/.versions/<name>/<v>``) is in."""
    return version.resolve().parent.parent.parent
