"""How a benchmark runs: `BenchConfig`, the one source of `retrieval bench`'s defaults.

Torch- and FAISS-free, so the command line reads its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..corpus.records import ReadOptions
from ..index.config import BankConfig
from ..model.runtime import FOLLOW_INDEX, RuntimeChoice
from ..model.spec import ModelSpec
from ..model.spool import SpoolOptions
from ..query.ranking import DEFAULT_MIX


@dataclass(frozen=True)
class BenchConfig:
    model: ModelSpec | None = None  # encode the dataset with this model ...
    index: str | None = None  # ... or evaluate this built index (and its model)
    index_dir: Path | None = None
    ks: tuple[int, ...] = (1, 5, 10)
    factories: tuple[str, ...] = ()  # approximate indexes to compare with exact search
    group_key: str | None = None  # also count any image whose metadata[key] matches as correct
    bank: Path | None = None  # querybank corpus (disjoint from the dataset) for the qbnorm row
    querybank: BankConfig = field(default_factory=BankConfig)
    mix: float = DEFAULT_MIX  # hybrid rows: weight of the caption signal (as `search`'s)
    read: ReadOptions = field(default_factory=ReadOptions)
    batch_size: int = SpoolOptions.batch_size
    workers: int | None = None
    device: str = "auto"
    progress: bool = True
    rerank: int | None = None  # also each strategy with its top N re-ordered by the re-ranker
    reranker: Path | None = None  # the checkpoint holding it (None: the model's own)
    runtime: RuntimeChoice = FOLLOW_INDEX  # what runs the model (an index's: its own)
    runtime_rows: bool = False  # also the exact row of every runtime and precision
