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
        with writer.lock(client, names, lite=is_lite(where.uri)):
            chosen = writer.build_version(client, names, new, norms, config.index).index_types
    finally:
        client.close()
    return where, described_indexes(where, chosen, (len(new.images), len(new.captions)))


def described_indexes(
    where: MilvusLocation, chosen: dict[str, str], sizes: tuple[int, int]
) -> dict[str, IndexEntry]:
    """The manifest's entries for the two collections' vector indexes."""
    counts = {"image": sizes[0], "caption": sizes[1]}
    why = "milvus-lite, " if is_lite(where.uri) else ""
    return {
        kind: IndexEntry("", chosen[kind], counts[kind], f"{why}Milvus {chosen[kind]} (IP)")
        for kind in counts
    }


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
        with writer.lock(client, names, wait, lite=is_lite(manifest.milvus.uri)):
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
        with writer.lock(client, names, wait, lite=is_lite(manifest.milvus.uri)):
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


class RankBuild:
    """One torchrun rank's part in a distributed build into a Milvus server (see
    `retrieval.index.build`): rank 0 holds the lock, creates and finishes the version; every
    rank inserts its own rows."""

    def __init__(self, root: Path, name: str, config: BuildConfig, leader: bool) -> None:
        self.root, self.where, self.leader = root, location(name, config), leader
        self.names = coll.Names(self.where.base)
        self.index = config.index
        self.client = None
        self.created: writer.Build | None = None

    def create(self, dim: int, counts: tuple[int, int]) -> None:
        self.created = writer.create_version(self.client, self.names, dim, counts, self.index)

    def share(self, build: writer.Build) -> None:
        self.created = build
        if self.client is None:
            self.client = client_for(self.where, self.root)

    def insert(self, entries, enc, mine, bank) -> None:
        """This rank's rows (``mine``: a (N,) mask over ``entries``), normalised against every
        row's vectors in ``enc`` (the whole corpus is the querybank)."""
        from ..querybank import normalisers

        assert self.created is not None
        picked = [e for e, m in zip(entries, mine, strict=True) if m]
        caption_rows = [c[1] for e in picked for c in e.captions]
        images, captions = enc.image_emb[mine], enc.caption_emb[caption_rows]
        norms = (
            normalisers(images, enc.caption_emb, bank),
            normalisers(captions, enc.image_emb, bank),
        )
        new = writer.Vectors(picked, images, captions)
        writer.insert_share(self.client, self.names, self.created, new, norms)

    def finish(self, entries, captions: int) -> None:
        assert self.created is not None
        writer.finish_version(self.client, self.names, self.created, entries, captions)

    def described(self, items: int, captions: int) -> dict[str, IndexEntry]:
        assert self.created is not None
        return described_indexes(self.where, self.created.index_types, (items, captions))


@contextlib.contextmanager
def rank_build(root: Path, name: str, config: BuildConfig, leader: bool) -> Iterator[RankBuild]:
    """A `RankBuild`; the leader (rank 0) holds the index's lock throughout."""
    target = RankBuild(root, name, config, leader)
    try:
        if leader:
            target.client = client_for(target.where, root)
            with writer.lock(target.client, target.names):
                yield target
        else:
            yield target
    finally:
        if target.client is not None:
            target.client.close()
