"""How a training run is set up: `TrainConfig`, the one source of every training default.

Torch-free, so the command line can read the defaults without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..corpus.records import ReadOptions
from ..model.spec import ModelSpec, RerankerConfig

DEFAULT_LR = 5e-4


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    epochs: int = 10
    steps: int | None = None  # total optimizer steps; overrides epochs
    batch_size: int = 128  # pairs per process per micro-batch
    chunk_size: int | None = None  # gradient caching: embed at most this many pairs at once
    accum_steps: int = 1  # micro-batches per optimizer step, all in one loss
    lr: float | None = None  # peak; None: DEFAULT_LR for a new run, the run's own on resume
    wd: float = 0.1
    warmup: int = 50  # steps of linear warm-up before the cosine decay
    grad_clip: float | None = None
    lock_image: int | None = None  # lock the image tower, leaving this many last groups free
    lock_text: int | None = None  # lock the text tower, leaving this many last layers free
    seed: int = 0
    val: Path | None = None
    val_fraction: float = 0.0
    workers: int | None = None
    device: str = "auto"
    read: ReadOptions = field(default_factory=ReadOptions)
    resume: bool = False
    progress: bool = True
    batch_group: str | None = None  # metadata field: items sharing its value share a batch
    hard_negatives: int | None = None  # every N epochs, batches from mined neighbourhoods
    save_every: int = 1  # epochs between checkpoints (the last epoch and a new best always save)
    cache_features: bool = True  # encode a fully locked tower once, train over its features
    full_checkpoints: bool = False  # a locked tower model's checkpoints hold its towers too
    # The small-data recipe (#29), each off by default until measured:
    all_captions: bool = False  # every (image, caption) pair each epoch, not one caption drawn
    augment_views: int = 1  # views per image: itself and random resized crops (1: none)
    early_stop: int | None = None  # stop after this many epochs without a better validation
    # The re-ranker (#23): image-text matching trained beside the contrastive loss.
    itm: bool = False
    itm_weight: float = 1.0  # the ITM loss's weight against the contrastive one
    # Share of ITM negatives drawn uniformly instead of by similarity: with hard ones only, a
    # new re-ranker on frozen towers never left the constant guess (benchmarks/README.md).
    itm_random: float = 0.5
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
