"""How an index is built: `BuildConfig`, the one source of every build default.

Torch- and FAISS-free, so the command line reads its defaults from here without loading them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..corpus.images import DEFAULT_MAX_PIXELS
from ..corpus.records import ReadOptions
from ..model.runtime import FOLLOW_INDEX, RuntimeChoice
from ..model.spec import ModelSpec
from ..model.spool import SpoolOptions

TARGET_RECALL = 0.95  # recall@10 that approximate indexes' search knobs are tuned to
VERIFY_SAMPLE = 16  # items `verify` re-encodes from their files by default
# The querybank's temperature and neighbours, chosen by measurement (benchmarks/README.md,
# "Query layer").
DEFAULT_BETA = 20.0
DEFAULT_M = 10


@dataclass(frozen=True)
class BankConfig:
    beta: float = DEFAULT_BETA
    m: int = DEFAULT_M


@dataclass(frozen=True)
class BuildConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    index: str = "auto"  # "auto" or a FAISS factory string, used for both indexes
    max_memory: int | None = None  # bytes of FAISS memory for both indexes ("auto" chooses)
    target_recall: float = TARGET_RECALL  # recall@10 search knobs are tuned to
    batch_size: int = SpoolOptions.batch_size
    workers: int | None = None  # image-decoding processes; None: cores - 1
    device: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS
    read: ReadOptions = field(default_factory=ReadOptions)
    progress: bool = True
    shard_size: int = SpoolOptions.shard_size  # a resumed build re-encodes at most one shard
    bank: Path | None = None  # querybank corpus; None: the corpus's own captions and images
    querybank: BankConfig = field(default_factory=BankConfig)
    backend: str = "faiss"  # or "milvus": vectors and metadata in Milvus collections
    milvus_uri: str | None = None  # None: a milvus-lite file under the index root
    patch_tokens: bool = False  # store each image's patch tokens for the re-ranker (--rerank)
    runtime: RuntimeChoice = FOLLOW_INDEX  # what runs the towers; add follows the index

    def spool_options(self, resume: bool = False) -> SpoolOptions:
        return SpoolOptions(
            batch_size=self.batch_size,
            workers=self.workers,
            max_pixels=self.max_pixels,
            shard_size=self.shard_size,
            resume=resume,
            progress=self.progress,
            patches=self.patch_tokens,
        )


BACKENDS = ("faiss", "milvus")

EXPORT_FORMATS = ("clip-retrieval", "npz", "parquet")


@dataclass(frozen=True)
class ExportConfig:
    """How `retrieval embeddings` writes an index's vectors (`retrieval.index.export`)."""

    format: str = "clip-retrieval"
    dtype: str = "float16"  # or "float32"
    chunk: int = 100_000  # items read and written at a time: ~100 MB of fp16 512-d vectors
