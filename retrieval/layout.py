"""The on-disk layout of an index folder, its manifest, and atomic publication.

``<index_dir>/<name>`` is a symbolic link to ``<index_dir>/.versions/<name>/<version>/``, the
folder that holds the files. A build writes a new version folder, writes ``manifest.json`` last,
then swaps the link with one ``rename`` (atomic on POSIX): a reader resolves the link once and
sees the previous index or the new one, never a half-written one. The previous version is kept
so that readers still holding it finish their work; older ones are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from .errors import SearchError

ENV_INDEX_DIR = "RETRIEVAL_INDEX_DIR"
DEFAULT_INDEX_DIR = Path("indexes")

MANIFEST = "manifest.json"
IMAGE_INDEX = "image.faiss"
CAPTION_INDEX = "caption.faiss"
STORE = "meta.lmdb"
EMBEDDINGS = "embeddings"
SKIPPED = "skipped.jsonl"
FORMAT_VERSION = 1

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


def publish(version: Path, root: Path, name: str) -> Path:
    """Point ``root/name`` at ``version`` atomically and prune versions no reader can reach."""
    link = root / name
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{link} exists and is not an index published by this engine")
    previous = link.resolve() if link.is_symlink() else None
    tmp = root / f".{name}.{uuid.uuid4().hex}.link"
    tmp.symlink_to(version.relative_to(root))
    tmp.replace(link)  # rename(2): the swap readers observe
    _fsync_dir(root)
    keep = {version.resolve(), previous}
    for old in (root / ".versions" / name).iterdir():
        # A folder without a manifest may be another build still running; leave it a day.
        stale = (old / MANIFEST).exists() or time.time() - old.stat().st_mtime > 86400
        if old.resolve() not in keep and stale:
            shutil.rmtree(old, ignore_errors=True)
    return link


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` durably: it is the last file of a build, its commit mark."""
    tmp = folder / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump({"format_version": FORMAT_VERSION, **manifest}, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
