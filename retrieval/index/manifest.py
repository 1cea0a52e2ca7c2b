"""``manifest.json``: what an index version is, written last as the version's commit mark.

`Manifest` names the model the index was built with (and its checkpoint's sha256), the two
FAISS indexes with their tuned search knobs, the counts, the corpus, the querybank settings,
the checksum of every file and the history of changes. It is read, validated and written here
only; everything else uses its fields. The JSON keys are the file format (``format_version``
1) and do not change with the field names.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import DamagedIndexError, EncoderError, IndexBuildError, SearchError
from ..files import atomic_write, sha256_file
from ..model.runtime import TORCH_FP32, Runtime
from ..model.spec import ModelIdentity, ModelSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
KINDS = ("image", "caption")  # the two FAISS indexes of a version
IMAGE_INDEX = "image.faiss"
CAPTION_INDEX = "caption.faiss"
INDEX_FILES = {"image": IMAGE_INDEX, "caption": CAPTION_INDEX}  # kind -> FAISS file


@dataclass(frozen=True)
class Tuning:
    """The search knob tuned at build time (efSearch or nprobe) and the recall it reached."""

    knob: str
    value: int
    recall_at_10: float
    target: float
    queries: int

    def to_json(self) -> dict[str, Any]:
        return {
            "knob": self.knob,
            "value": self.value,
            "recall@10": self.recall_at_10,
            "target": self.target,
            "queries": self.queries,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Tuning:
        return cls(d["knob"], int(d["value"]), d["recall@10"], d["target"], int(d["queries"]))


@dataclass(frozen=True)
class IndexEntry:
    """One FAISS index of a version: its file, factory string, vector count and why chosen."""

    file: str
    factory: str
    count: int
    why: str = ""
    memory_bytes: int = 0
    search: Tuning | None = None  # None: exact, nothing to tune

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("file", "factory", "count", "why", "memory_bytes")}
        return {**out, "search": self.search.to_json() if self.search else None}

    @classmethod
    def from_json(cls, d: dict[str, Any], kind: str, milvus: bool = False) -> IndexEntry:
        # A path read from the file never leaves the folder; Milvus indexes have no file.
        if d["file"] != ("" if milvus else INDEX_FILES[kind]):
            raise ValueError(f"the {kind} index is {d['file']!r}, not {INDEX_FILES[kind]!r}")
        search = Tuning.from_json(d["search"]) if d.get("search") else None
        return cls(
            d["file"], d["factory"], int(d["count"]), d.get("why", ""),
            int(d.get("memory_bytes", 0)), search,
        )  # fmt: skip


@dataclass(frozen=True)
class MilvusLocation:
    """Where a Milvus-backed index lives: the URI (a relative ``.db`` path is a milvus-lite
    file under the index root) and the collections' name base. Never the token."""

    uri: str
    base: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": "milvus", "uri": self.uri, "collections": self.base}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MilvusLocation:
        if d.get("kind") != "milvus":
            raise ValueError(f"unknown backend {d.get('kind')!r}")
        return cls(str(d["uri"]), str(d["collections"]))


@dataclass(frozen=True)
class Counts:
    items: int
    captions: int
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    tombstones: dict[str, int] = field(default_factory=dict)  # kind -> removed rows still in FAISS

    def to_json(self) -> dict[str, Any]:
        out = {
            "items": self.items,
            "captions": self.captions,
            "skipped": self.skipped,
            "skipped_by_reason": dict(self.skipped_by_reason),
        }
        return {**out, "tombstones": dict(self.tombstones)} if self.tombstones else out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Counts:
        return cls(
            int(d["items"]), int(d["captions"]), int(d.get("skipped", 0)),
            dict(d.get("skipped_by_reason") or {}), dict(d.get("tombstones") or {}),
        )  # fmt: skip


@dataclass(frozen=True)
class QuerybankSettings:
    beta: float
    m: int
    bank: str  # "corpus" (its own captions and images) or the bank corpus's path


@dataclass(frozen=True)
class Change:
    """One entry of the history: ``op`` (add, remove, compact) at time ``at``, and its figures."""

    op: str
    at: str
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "at": self.at, **self.detail}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Change:
        return cls(d["op"], d["at"], {k: v for k, v in d.items() if k not in ("op", "at")})


@dataclass(frozen=True)
class Manifest:
    name: str
    created: str
    package_version: str
    model: str
    pretrained: str | None
    checkpoint_sha256: str | None
    dim: int
    context_length: int
    indexes: dict[str, IndexEntry]  # kind ("image", "caption") -> its FAISS index
    counts: Counts
    corpus: str
    querybank: QuerybankSettings
    max_memory: int | None = None
    build_seconds: float | None = None
    updated: str | None = None
    history: tuple[Change, ...] = ()
    sha256: dict[str, str] = field(default_factory=dict)  # file (relative) -> digest
    sizes: dict[str, int] = field(default_factory=dict)  # file (relative) -> bytes (cheap check)
    random_init: bool = False  # built with random weights (a test index)
    milvus: MilvusLocation | None = None  # None: FAISS + LMDB files in the version folder
    runtime: Runtime = TORCH_FP32  # what encoded it; later commands follow it unless told

    @property
    def backend(self) -> str:
        return "faiss" if self.milvus is None else "milvus"

    @classmethod
    def new(cls, name: str, model: ModelIdentity, **fields: Any) -> Manifest:
        """The manifest of a new index built now by this package, with ``model``'s weights."""
        return cls(
            name=name,
            created=now(),
            package_version=__version__,
            model=model.model,
            pretrained=model.pretrained,
            checkpoint_sha256=model.checkpoint_sha256,
            random_init=model.random_init,
            **fields,
        )

    def to_json(self) -> dict[str, Any]:
        plain = ("name", "created", "package_version", "model", "pretrained", "dim", "corpus")
        out: dict[str, Any] = {k: getattr(self, k) for k in plain}
        out |= {
            "format_version": FORMAT_VERSION,
            "checkpoint_sha256": self.checkpoint_sha256,
            "random_init": self.random_init,
            "runtime": self.runtime.to_json(),
            "context_length": self.context_length,
            "indexes": {k: v.to_json() for k, v in self.indexes.items()},
            "counts": self.counts.to_json(),
            "querybank": vars(self.querybank).copy(),
            "max_memory": self.max_memory,
            "sha256": dict(self.sha256),
        }
        out |= {"bytes": dict(self.sizes)} if self.sizes else {}
        out |= {"backend": self.milvus.to_json()} if self.milvus else {}
        optional = {"build_seconds": self.build_seconds, "updated": self.updated}
        out |= {k: v for k, v in optional.items() if v is not None}
        return out | ({"history": [c.to_json() for c in self.history]} if self.history else {})

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """Validate the JSON of a manifest; a `KeyError`/`TypeError`/`ValueError` if malformed."""
        if d.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"format_version {d['format_version']} (this engine reads 1)")
        q = d["querybank"]
        milvus = MilvusLocation.from_json(d["backend"]) if d.get("backend") else None
        return cls(
            name=d["name"],
            created=d["created"],
            package_version=d["package_version"],
            model=d["model"],
            pretrained=d.get("pretrained"),
            checkpoint_sha256=d.get("checkpoint_sha256"),
            dim=int(d["dim"]),
            context_length=int(d["context_length"]),
            indexes={k: IndexEntry.from_json(d["indexes"][k], k, bool(milvus)) for k in KINDS},
            counts=Counts.from_json(d["counts"]),
            corpus=d["corpus"],
            querybank=QuerybankSettings(float(q["beta"]), int(q["m"]), str(q["bank"])),
            max_memory=d.get("max_memory"),
            build_seconds=d.get("build_seconds"),
            updated=d.get("updated"),
            history=tuple(Change.from_json(c) for c in d.get("history", [])),
            sha256=dict(d.get("sha256") or {}),
            sizes={k: int(v) for k, v in (d.get("bytes") or {}).items()},
            # Before the key existed, no weights meant random ones.
            random_init=bool(d.get("random_init", d.get("pretrained") is None)),
            milvus=milvus,
            runtime=_runtime(d.get("runtime")),
        )

    def model_spec(self) -> ModelSpec:
        """The model the index was built with; its checkpoint must still be there, unchanged."""
        spec = ModelSpec(self.model, self.pretrained, self.random_init)
        if self.checkpoint_sha256:
            path = spec.checkpoint
            if path is None:
                raise SearchError(
                    f"the checkpoint this index was built with is gone: {self.pretrained}; if it "
                    "moved, put it back, or give search, serve and bench its new path with "
                    "--pretrained"
                )
            if sha256_file(path) != self.checkpoint_sha256:
                raise SearchError(f"the checkpoint {path} changed since the index was built")
        return spec

    def spec_for(self, asked: ModelSpec | None) -> ModelSpec:
        """The model to encode for this index with: its own, or ``asked`` once checked to be
        the same (a name left empty means the index's own, its checkpoint at a new path)."""
        if asked is None:
            return self.model_spec()
        if not asked.name:
            asked = replace(asked, name=self.model)
        self.check_model(asked)
        return asked

    def check_runtime(self, runtime: Runtime, asked: bool) -> None:
        """Refuse to add rows encoded at another precision than the index's when ``asked``
        for it; warn when the device chose it (on CUDA the towers run in torch)."""
        if runtime.precision == self.runtime.precision:
            return
        why = (
            f"index {self.name!r} was encoded with {self.runtime}, and these records would be "
            f"encoded with {runtime}"
        )
        if asked:
            raise IndexBuildError(
                f"{why}: one index holds one precision; leave out --runtime/--precision, or "
                "rebuild the index with them"
            )
        log.warning("%s (the device's runtime); their vectors differ slightly", why)

    def check_model(self, spec: ModelSpec | None) -> None:
        """Refuse to query the index with a model other than the one it was built with."""
        if spec is None:
            return
        asked = spec.identity()
        same_weights = (
            asked.checkpoint_sha256 == self.checkpoint_sha256
            if self.checkpoint_sha256 or asked.checkpoint_sha256
            else (asked.pretrained, asked.random_init) == (self.pretrained, self.random_init)
        )
        if asked.model != self.model or not same_weights:
            raise SearchError(
                f"index {self.name!r} was built with model {self.model} "
                f"(pretrained: {self.pretrained or 'none'}), not {asked.model} "
                f"(pretrained: {asked.pretrained or 'none'}); search it without --model (or "
                "with --pretrained alone, for its checkpoint at a new path), or rebuild it"
            )


def _runtime(d: dict[str, str] | None) -> Runtime:
    try:
        return Runtime.from_json(d)
    except (EncoderError, TypeError) as e:  # a malformed manifest, not a model problem
        raise ValueError(f"runtime: {e}") from None


def now() -> str:
    """The manifest's timestamps: UTC, to the second, ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` durably: it is the last file of a build, its commit mark."""
    with atomic_write(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=True)


def read_manifest(folder: Path) -> Manifest:
    """The manifest of version ``folder``; a one-line `SearchError` if it is malformed.

    A missing file raises `FileNotFoundError`: readers retry when a writer pruned the version.
    """
    path = folder / MANIFEST
    try:
        return Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = f"missing field {e}" if isinstance(e, KeyError) else str(e) or type(e).__name__
        raise DamagedIndexError(
            f"index {folder.parent.name!r} is damaged: {MANIFEST} is unreadable ({why}) in "
            f"{folder}; `retrieval verify {folder.parent.name} --rollback` returns to the "
            "previous version"
        ) from None
