"""Where the rest of the engine meets the Milvus backend: build into it, open it for queries
and for changes. Everything Milvus-specific stays behind these few functions."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import DamagedIndexError, IndexBuildError
from ..config import BuildConfig
from ..manifest import IndexEntry, Manifest, MilvusLocation
from . import collections as coll
from . import writer
from .client import connect, default_uri, guard, is_lite, resolve_uri
from .lock import lock
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
    if config.patch_tokens:
        raise IndexBuildError(
            "--patch-tokens is not available with --backend milvus yet: --rerank on a Milvus "
            "index decodes and encodes its candidates' images at query time"
        )
    if config.index != "auto" and config.index not in coll.INDEX_TYPES:
        raise IndexBuildError(
            f"--index {config.index!r} is a FAISS index; with --backend milvus give auto or "
            f"one of {', '.join(coll.INDEX_TYPES)}"
        )


@dataclass(frozen=True)
class Destination:
    """Where a build goes: index ``name`` under ``root``, built as ``config`` says, with the
    vectors of ``model`` (`collections.model_key`); ``wait``: seconds for another writer."""

    root: Path
    name: str
    config: BuildConfig
    model: str
    wait: float = 0.0

    @property
    def where(self) -> MilvusLocation:
        return location(self.name, self.config)

    def publish(self) -> writer.Publish:
        return writer.Publish(self.model, grace_s(self.where.uri))


def grace_s(uri: str) -> float:
    """How long a writer on ``uri`` waits before a reader may see its change (0: milvus-lite)."""
    return 0.0 if is_lite(uri) else coll.bounded_staleness_s()


def write_build(
    to: Destination, new: writer.Vectors, norms
) -> tuple[MilvusLocation, dict[str, IndexEntry]]:
    """Write a new version of the index into Milvus and switch readers to it."""
    how = (to.config.index, to.publish())  # a bad $RETRIEVAL_MILVUS_GRACEFUL_MS fails here
    client = client_for(to.where, to.root)
    try:
        names = coll.Names(to.where.base)
        with lock(client, names, to.wait, lite=is_lite(to.where.uri)):
            chosen = writer.build_version(client, names, new, norms, how).index_types
    finally:
        client.close()
    return to.where, described_indexes(to.where, chosen, (len(new.images), len(new.captions)))


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
    names = coll.Names(manifest.milvus.base)
    space = MilvusSpace(
        client, names, manifest.querybank.beta, model_of(manifest), manifest.dim,
        current=is_lite(manifest.milvus.uri),
    )  # fmt: skip
    return space, MilvusItems(space)


def model_of(manifest: Manifest) -> str:
    return coll.model_key(
        manifest.model, manifest.pretrained, manifest.checkpoint_sha256, manifest.random_init
    )


@contextlib.contextmanager
def changing(manifest: Manifest, root: Path, wait: float = 0.0) -> Iterator[writer.Version]:
    """The current version, locked for one change, any dead writer's change cleaned up."""
    assert manifest.milvus is not None
    grace = grace_s(manifest.milvus.uri)
    client = client_for(manifest.milvus, root)
    names = coll.Names(manifest.milvus.base)
    try:
        with lock(client, names, wait, lite=is_lite(manifest.milvus.uri)):
            yield writer.open_version(client, names, grace)
    finally:
        client.close()


def rollback(manifest: Manifest, root: Path, wait: float = 0.0) -> str:
    """Point the aliases back at the newest earlier version that is whole (a state row, no
    change left half-done) and holds this manifest's model; the collection they name now."""
    assert manifest.milvus is not None
    client = client_for(manifest.milvus, root)
    names = coll.Names(manifest.milvus.base)
    try:
        lite = is_lite(manifest.milvus.uri)
        with lock(client, names, wait, lite=lite), guard("rolling back"):
            current = coll.current(client, names)
            earlier = [
                    v for v in coll.versions(client, names)
                    if current is not None and names.version_of(v) < names.version_of(current)
                ]  # fmt: skip
            for version in reversed(earlier):
                state = coll.read_row(client, names, f"state:{version}")
                whole = state is not None and not state.get("pending")
                if whole and state.get("model", "") in ("", model_of(manifest)):
                    coll.switch(client, names, version)
                    return version
    finally:
        client.close()
    raise DamagedIndexError(
        f"index {manifest.name!r} has no earlier version in Milvus with its model; rebuild "
        f"it: `retrieval build CORPUS --name {manifest.name} --backend milvus`"
    )


class RankBuild:
    """One torchrun rank's part in a distributed build into a Milvus server (see
    `retrieval.index.build`): rank 0 holds the lock, creates and finishes the version; every
    rank inserts its own rows."""

    def __init__(self, to: Destination, leader: bool) -> None:
        self.to, self.root, self.where, self.leader = to, to.root, to.where, leader
        self.names = coll.Names(self.where.base)
        self.index = to.config.index
        self.publish = to.publish()  # a bad $RETRIEVAL_MILVUS_GRACEFUL_MS fails before any write
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
        rows = (entries, captions)
        writer.finish_version(self.client, self.names, self.created, rows, self.publish)

    def described(self, items: int, captions: int) -> dict[str, IndexEntry]:
        assert self.created is not None
        return described_indexes(self.where, self.created.index_types, (items, captions))


@contextlib.contextmanager
def rank_build(to: Destination, leader: bool) -> Iterator[RankBuild]:
    """A `RankBuild`; the leader (rank 0) holds the index's lock throughout."""
    target = RankBuild(to, leader)
    try:
        if leader:
            target.client = client_for(target.where, to.root)
            with lock(target.client, target.names, to.wait):
                yield target
        else:
            yield target
    finally:
        if target.client is not None:
            target.client.close()
