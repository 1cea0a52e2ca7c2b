"""Where the rest of the engine meets the Milvus backend: build into it, open it for queries
and for changes. Everything Milvus-specific stays behind these few functions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ...errors import DamagedIndexError, IndexBuildError
from ..config import BuildConfig
from ..manifest import IndexEntry, Manifest, MilvusLocation
from . import collections as coll
from . import writer
from .client import connect, default_uri, is_lite, resolve_uri
from .space import MilvusItems, MilvusSpace


def location(name: str, config: BuildConfig) -> MilvusLocation:
    return MilvusLocation(config.milvus_uri or default_uri(name), coll.base_name(name))


def client_for(where: MilvusLocation, root: Path):
    return connect(resolve_uri(where.uri, root))


def check_config(config: BuildConfig) -> None:
    """Build options the Milvus backend cannot honour, refused before any encoding."""
    if config.bank is not None:
        raise IndexBuildError(
            "--bank is not available with --backend milvus yet: build without it (the "
            "corpus's own captions and images are the querybank)"
        )
    if config.index != "auto" and config.index not in coll.INDEX_TYPES:
        raise IndexBuildError(
            f"--index {config.index!r} is a FAISS index; with --backend milvus give auto or "
            f"one of {', '.join(coll.INDEX_TYPES)}"
        )


def write_build(
    root: Path, name: str, new: writer.Vectors, norms, config: BuildConfig
) -> tuple[MilvusLocation, dict[str, IndexEntry]]:
    """Write a new version of index ``name`` into Milvus and switch readers to it."""
    where = location(name, config)
    client = client_for(where, root)
    try:
        names = coll.Names(where.base)
        with writer.lock(client, names):
            _, chosen = writer.build_version(client, names, new, norms, config.index)
    finally:
        client.close()
    counts = {"image": len(new.images), "caption": len(new.captions)}
    why = "milvus-lite, " if is_lite(where.uri) else ""
    described = {
        kind: IndexEntry("", chosen[kind], counts[kind], f"{why}Milvus {chosen[kind]} (IP)")
        for kind in counts
    }
    return where, described


def open_space(manifest: Manifest, root: Path) -> tuple[MilvusSpace, MilvusItems]:
    """The query layer's view of a Milvus-backed index."""
    assert manifest.milvus is not None
    client = client_for(manifest.milvus, root)
    space = MilvusSpace(
        client, coll.Names(manifest.milvus.base), manifest.querybank.beta, manifest.dim
    )
    return space, MilvusItems(space)


@contextlib.contextmanager
def changing(manifest: Manifest, root: Path, wait: float = 0.0) -> Iterator[writer.Version]:
    """The current version, locked for one change, any dead writer's change cleaned up."""
    assert manifest.milvus is not None
    client = client_for(manifest.milvus, root)
    names = coll.Names(manifest.milvus.base)
    grace = 0.0 if is_lite(manifest.milvus.uri) else coll.BOUNDED_STALENESS_S
    try:
        with writer.lock(client, names, wait):
            yield writer.open_version(client, names, grace)
    finally:
        client.close()


def rollback(manifest: Manifest, root: Path, wait: float = 0.0) -> str:
    """Point the aliases back at the version before the current one (one is kept); the
    collection they name now."""
    assert manifest.milvus is not None
    client = client_for(manifest.milvus, root)
    names = coll.Names(manifest.milvus.base)
    try:
        with writer.lock(client, names, wait):
            current = coll.current(client, names)
            older = [v for v in coll.versions(client, names) if v != current]
            if current is None or not older:
                raise DamagedIndexError(
                    f"index {manifest.name!r} has no previous version in Milvus; rebuild it: "
                    f"`retrieval build CORPUS --name {manifest.name} --backend milvus`"
                )
            coll.switch(client, names, older[-1])
            return older[-1]
    finally:
        client.close()
