"""The embedded default: generate the synthetic corpus, build an index, run example searches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..corpus import synthetic
from ..index.build import BuildReport, build
from ..index.config import BuildConfig
from ..model import reranker
from ..model.encoder import Encoder
from ..model.spec import ModelSpec, demo_model
from .search import Query, Searcher

TEXT_QUERIES = ("a red circle left of a blue square", "a yellow triangle above a green square")
RERANK = 20  # the demo's re-ranked query: its top 20


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("demo-data")
    n: int = 400
    seed: int = 0
    name: str = "demo"
    model: ModelSpec = field(default_factory=demo_model)
    index_dir: Path | None = None
    k: int = 5
    progress: bool = True


@dataclass
class DemoResult:
    corpus: Path
    report: BuildReport
    trained: bool  # False while the model has random weights: rankings mean nothing yet
    searches: list[dict[str, Any]]


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Generate (or reuse) the synthetic corpus, build index ``config.name``, query it."""
    config = config or DemoConfig()
    corpus = config.workdir / "corpus.jsonl"
    if not corpus.is_file():
        corpus = synthetic.generate(config.workdir, n=config.n, seed=config.seed)
    encoder = Encoder.load(config.model)
    # A model trained with its re-ranker (the shipped one is): patches stored, one query
    # re-ranked.
    reranks = reranker.load(encoder.spec.checkpoint, encoder.model) is not None
    report = build(
        corpus,
        config.name,
        BuildConfig(model=config.model, progress=config.progress, patch_tokens=reranks),
        index_dir=config.index_dir,
        encoder=encoder,
    )
    probe = config.workdir / "images" / f"{0:06d}.png"
    queries = [(Query(text=t), None, None) for t in TEXT_QUERIES]
    queries += [(Query(image=probe), "captions", None), (Query(image=probe), "images", None)]
    if reranks:
        queries.append((Query(text=TEXT_QUERIES[0]), None, RERANK))
    with Searcher.open(config.name, config.index_dir, encoder=encoder) as searcher:
        searches = [searcher.search(q, k=config.k, target=t, rerank=r) for q, t, r in queries]
    return DemoResult(corpus, report, config.model.weights is not None, searches)
