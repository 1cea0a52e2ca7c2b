"""effnet-minilm on real photos: Recall@K of its starts and of training from them, on coco-mini.

Two protocols over ../shared/data/coco-mini (239 COCO photos, 1,195 captions):
- the split: train on the 159 val2017 photos, evaluate on the 80 train2017 ones (3 seeds);
- 5-fold cross-validation over all 239 photos (folds by photo, seed 0).
Rows: the starts without training (the ImageNet-label bridge, the shipped weights); then
effnet-minilm with both towers locked (projections and temperature only) from random
projections and from the bridge, + all captions, + 4 views (tiny-vit from scratch, the floor,
is in "Quality"); and the peer, open_clip_train, on the same model, start and samples. Every
row of ours is `retrieval train` with the evaluation set as `--val`; the figures are the last
epoch's (no early stop, so the evaluation set chooses nothing); the peer's last checkpoint is
scored by the same code.

    .venv/bin/pip install braceexpand webdataset pandas   # open_clip_train's data deps (peer)
    .venv/bin/python benchmarks/real_photos.py        # -> results/real_photos.json; ~45 min
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from machine import describe

from retrieval.model import towers
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec
from retrieval.scoring.metrics import retrieval_metrics
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
BRIDGE = ModelSpec("effnet-minilm", pretrained="package:effnet-minilm-bridge.pt")
FROM_BRIDGE = replace(LOCKED, model=BRIDGE)
ROWS = {
    "effnet-minilm, projections only": LOCKED,
    "+ all captions": replace(LOCKED, all_captions=True),
    "+ 4 views": replace(LOCKED, augment_views=4),
    "+ all captions + 4 views": replace(LOCKED, all_captions=True, augment_views=4),
    "bridge start, projections only": FROM_BRIDGE,
    "bridge start + all captions + 4 views": replace(
        FROM_BRIDGE, all_captions=True, augment_views=4
    ),
    # timm's last group of the trunk (its last block and head conv) trains too, over cached maps.
    "bridge start + last block open": replace(FROM_BRIDGE, lock_image=1),
}
UNTRAINED = {
    "ImageNet-label bridge, no training": BRIDGE,
    "shipped weights, no training": ModelSpec("effnet-minilm"),
}
FOLD_ROWS = (
    "effnet-minilm, projections only",
    "+ all captions + 4 views",
    "bridge start, projections only",
    "bridge start + all captions + 4 views",
)
# The peer runs live (~11 samples/s here): compared at 6 of its epochs from each start.
PEER_STEPS, PEER_WARMUP = 36, 12
# open_clip_train in a child process: the resolved config registered under its own name.
PEER = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; main(sys.argv[2:])"
)


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


def zero_shot(spec: ModelSpec, records: list[dict]) -> list[float]:
    """Recall@K of ``spec`` as it is, on ``records`` (every caption a query)."""
    encoder = Encoder.load(spec, device="cpu")
    images, _, failed = encoder.encode_image_files([Path(r["image"]) for r in records], workers=0)
    assert not failed, failed
    texts = encoder.encode_texts([c for r in records for c in r["captions"]])
    owner = np.repeat(np.arange(len(records)), [len(r["captions"]) for r in records])
    metrics = retrieval_metrics(images, texts, owner)
    return [round(metrics[k.removeprefix("val_")], 4) for k in KEYS]


def timed_train(config: TrainConfig, train_set: Path, tmp: Path) -> float:
    """Our samples/s for ``config`` (no validation), start to end as a user waits for it."""
    start = time.perf_counter()
    train(train_set, tmp / f"timed-{time.monotonic_ns()}", config)
    return config.steps * config.batch_size / (time.perf_counter() - start)


def peer_start(spec: ModelSpec, tmp: Path) -> tuple[Path, Path]:
    """(config folder, full checkpoint) for open_clip_train: the same model and weights."""
    tower = towers.of("effnet-minilm")
    config = towers.read_config(towers.CONFIG_DIR / "effnet-minilm.json")
    text = config["model_cfg"]["text_cfg"]
    text["hf_model_name"] = text["hf_tokenizer_name"] = str(towers.locate(tower.text_weights, ""))
    folder = tmp / "peer-config"
    folder.mkdir(exist_ok=True)
    (folder / "effnet-minilm-peer.json").write_text(json.dumps(config["model_cfg"]))
    model = Encoder.load(spec, device="cpu").model
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    ckpt = tmp / f"peer-start-{abs(hash(spec)) % 10**8}.pt"
    torch.save({"state_dict": state}, ckpt)
    return folder, ckpt


def peer(config: TrainConfig, fit: list[dict], held: list[dict], tmp: Path) -> dict:
    """open_clip_train from ``config.model``'s weights, both towers locked, ``config``'s
    samples and schedule: Recall@K of its last checkpoint and its samples/s (start to end)."""
    folder, start = peer_start(config.model, tmp)
    table = tmp / "peer-train.csv"
    with table.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["filepath", "title"])
        out.writerows([r["image"], c] for r in fit for c in r["captions"])
    rows = sum(len(r["captions"]) for r in fit)
    steps_per_epoch = rows // config.batch_size  # its loader drops the last partial batch
    epochs = -(-config.steps // steps_per_epoch)
    args = [
        "--train-data", str(table), "--dataset-type", "csv", "--csv-separator", ",",
        "--model", "effnet-minilm-peer", "--pretrained", str(start),
        "--lock-image", "--lock-text", "--batch-size", str(config.batch_size),
        "--epochs", str(epochs), "--lr", str(config.lr), "--wd", str(config.wd),
        "--warmup", str(config.warmup), "--precision", "fp32", "--device", "cpu",
        "--workers", "1", "--seed", "0", "--logs", str(tmp / "peer-logs"),
        "--name", start.stem, "--save-frequency", str(epochs),
        "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.5", "0.5", "0.5",
        "--image-interpolation", "bicubic", "--image-resize-mode", "shortest",
    ]  # fmt: skip
    begin = time.perf_counter()
    subprocess.run([sys.executable, "-c", PEER, str(folder), *args], check=True)
    seconds = time.perf_counter() - begin
    last = tmp / "peer-logs" / start.stem / "checkpoints" / f"epoch_{epochs}.pt"
    return {
        "recall": zero_shot(ModelSpec("effnet-minilm", pretrained=str(last)), held),
        "samples_per_s": round(epochs * steps_per_epoch * config.batch_size / seconds, 1),
        "steps": epochs * steps_per_epoch,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "real_photos.json"
    )
    args = ap.parse_args()
    records = corpus()
    report: dict = {"machine": describe(), "keys": KEYS, "split": {}, "5-fold": {}, "peer": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train_records = [r for r in records if r["split"] == "val2017"]
        val_records = [r for r in records if r["split"] == "train2017"]
        train_set = write(train_records, tmp / "val2017.json")
        val_set = write(val_records, tmp / "train2017.json")
        for name, spec in UNTRAINED.items():
            report["split"][name] = zero_shot(spec, val_records)
            print("split", name, report["split"][name], flush=True)
        for name, config in (("random start", LOCKED), ("bridge start", FROM_BRIDGE)):
            config = replace(config, steps=PEER_STEPS, warmup=PEER_WARMUP, lr=5e-4)
            theirs = peer(config, train_records, val_records, tmp)
            report["peer"][name] = theirs | {
                "ours": run(config, train_set, val_set, 0, tmp),
                "ours_samples_per_s": round(timed_train(config, train_set, tmp), 1),
            }
            print("peer", name, report["peer"][name], flush=True)
        for name, config in ROWS.items():
            runs = [run(config, train_set, val_set, s, tmp) for s in range(args.seeds)]
            report["split"][name] = np.mean(runs, axis=0).round(4).tolist()
            print("split", name, report["split"][name], flush=True)
        folds = np.random.default_rng(0).permutation(len(records)) % 5
        held = [[r for r, g in zip(records, folds, strict=True) if g == f] for f in range(5)]
        report["5-fold"]["ImageNet-label bridge, no training"] = (
            np.mean([zero_shot(BRIDGE, h) for h in held], axis=0).round(4).tolist()
        )
        for name in FOLD_ROWS:
            runs = []
            for f in range(5):
                rest = [r for r, g in zip(records, folds, strict=True) if g != f]
                a, b = write(rest, tmp / f"rest{f}.json"), write(held[f], tmp / f"held{f}.json")
                runs.append(run(ROWS[name], a, b, 0, tmp))
            report["5-fold"][name] = np.mean(runs, axis=0).round(4).tolist()
            print("5-fold", name, report["5-fold"][name], flush=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
