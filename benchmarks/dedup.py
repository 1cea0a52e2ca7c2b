"""Where near-copies end: the --dedup threshold, measured on real photos.

effnet-minilm (offline, the engine's encoder) over coco-mini's 239 photos. Near-copies of each
photo, as collections are full of them: re-saved as JPEG at quality 40, resized to half and
back, cropped to the central 90% and 80%. Distinct photos: each photo against its most similar
*other* photo of the set (the hardest distinct pair it has). The default threshold is the
lowest (in steps of 0.01) above every distinct pair's similarity: it folds no two distinct
photos of this set; what share of each kind of near-copy it folds is recorded beside it.

    .venv/bin/python benchmarks/dedup.py        # -> results/dedup.json; ~2 min
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from machine import describe
from PIL import Image

from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def copies(im: Image.Image) -> dict[str, Image.Image]:
    w, h = im.size
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=40)
    out = {"jpeg q40": Image.open(io.BytesIO(buf.getvalue())).convert("RGB")}
    out["half size"] = im.resize((w // 2, h // 2), Image.BICUBIC).resize((w, h), Image.BICUBIC)
    for keep in (0.9, 0.8):
        dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
        out[f"crop {int(keep * 100)}%"] = im.crop((dx, dy, w - dx, h - dy))
    return out


def main() -> None:
    encoder = Encoder.load(ModelSpec("effnet-minilm"), device="cpu")
    photos = sorted((COCO_MINI / "images").glob("*.jpg"))
    originals = [Image.open(p).convert("RGB") for p in photos]
    base = encoder.encode_pil(originals)  # (N, D) unit
    sims = base @ base.T
    np.fill_diagonal(sims, -1.0)
    distinct = sims.max(axis=1)  # each photo's most similar other photo
    near: dict[str, list[float]] = {}
    for i, im in enumerate(originals):
        variants = copies(im)
        emb = encoder.encode_pil(list(variants.values()))
        for name, cos in zip(variants, emb @ base[i], strict=True):
            near.setdefault(name, []).append(float(cos))
    lowest_copy = min(min(v) for v in near.values())
    threshold = round(float(np.ceil(float(distinct.max()) * 100 + 1e-9)) / 100, 2)
    report = {
        "machine": describe(),
        "photos": len(photos),
        "distinct_max": round(float(distinct.max()), 4),
        "distinct_p99": round(float(np.percentile(distinct, 99)), 4),
        "near_copies": {
            k: {
                "min": round(min(v), 4),
                "median": round(float(np.median(v)), 4),
                "folded": round(float(np.mean(np.array(v) >= threshold)), 4),
            }
            for k, v in near.items()
        },
        "separate": bool(lowest_copy > distinct.max()),
        "threshold": threshold,
    }
    print(json.dumps(report, indent=2))
    out = Path(__file__).parent / "results" / "dedup.json"
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
