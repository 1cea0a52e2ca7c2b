"""Recall@K with the models this project can train here, on synthetic data and on coco-mini.

    python benchmarks/quality.py [--out benchmarks/results/quality] [--coco-epochs 30]

1. Synthetic: a held-out split (seed 999, shares no image with the demo model's training data),
   scored per image and per scene (any image of the caption's scene counts), for the untrained
   tiny model and for the shipped demo model.
2. coco-mini (../shared/data/coco-mini; skipped with a message when absent): trains tiny-vit
   from scratch on the 159 val2017 photos with `retrieval train`, then scores the 80 train2017
   photos, which it never saw, for the untrained model, the demo model and the coco-trained one.

Each evaluation is `retrieval bench` with exact search plus an HNSW row; every table is written
as markdown and JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from retrieval.corpus import synthetic
from retrieval.corpus.records import ReadOptions
from retrieval.eval.bench import run_bench
from retrieval.eval.config import BenchConfig
from retrieval.eval.report import to_json, to_markdown
from retrieval.model.spec import SHIPPED_MODEL, ModelSpec
from retrieval.train.config import TrainConfig
from retrieval.train.loop import train

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def bench(name: str, dataset: Path, model: ModelSpec, out: Path, **kw) -> str:
    config = BenchConfig(model=model, factories=("HNSW32",), progress=False, **kw)
    result = run_bench(dataset, config)
    (out / f"{name}.json").write_text(json.dumps(to_json(result), indent=2) + "\n")
    weights = Path(model.pretrained).name if model.pretrained else "random"
    head = (
        f"**{name}** ({result.images} images, {result.captions} "
        f"captions; {model.name}, weights: {weights})\n\n"
    )
    return head + to_markdown(result)


def synthetic_part(out: Path, tmp: Path) -> list[str]:
    corpus = synthetic.generate(tmp / "heldout", n=1000, seed=999)
    tables = [
        bench(
            "synthetic-untrained",
            corpus,
            ModelSpec("tiny-vit", random_init=True),
            out,
            group_key="scene",
        )
    ]
    if SHIPPED_MODEL.is_file():
        tables.append(
            bench(
                "synthetic-demo-model",
                corpus,
                ModelSpec("tiny-vit", str(SHIPPED_MODEL)),
                out,
                group_key="scene",
            )
        )
    return tables


def coco_model(out: Path, epochs: int) -> ModelSpec:
    """tiny-vit trained from scratch on coco-mini's 159 val2017 photos (the recipe both the
    quality and the query-layer benchmarks score on the 80 train2017 photos)."""
    run = train(
        COCO_MINI / "captions.json",
        out,
        TrainConfig(
            epochs=epochs,
            batch_size=53,
            lr=1e-3,
            warmup=10,
            read=ReadOptions(split="val2017"),
            progress=False,
        ),
    )
    return ModelSpec("tiny-vit", str(run.latest))


def coco_part(out: Path, tmp: Path, epochs: int) -> list[str]:
    if not COCO_MINI.is_dir():
        print(f"skipping coco-mini: {COCO_MINI} is not present")
        return []
    captions = COCO_MINI / "captions.json"
    trained = coco_model(tmp / "coco-run", epochs)
    test = ReadOptions(split="train2017")
    tables = [
        bench(
            "coco-mini-untrained", captions, ModelSpec("tiny-vit", random_init=True), out, read=test
        )
    ]
    if SHIPPED_MODEL.is_file():
        tables.append(
            bench(
                "coco-mini-demo-model",
                captions,
                ModelSpec("tiny-vit", str(SHIPPED_MODEL)),
                out,
                read=test,
            )
        )
    tables.append(
        bench(
            "coco-mini-trained-on-val2017",
            captions,
            trained,
            out,
            read=test,
        )
    )
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    ap.add_argument("--coco-epochs", type=int, default=30)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tables = synthetic_part(args.out, Path(tmp)) + coco_part(
            args.out, Path(tmp), args.coco_epochs
        )
    report = "\n\n".join(tables)
    (args.out / "tables.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
