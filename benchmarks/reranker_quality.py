"""The re-ranker's quality: mirror accuracy, Recall@K with `--rerank N`, and the fusion ablation.

For a dual encoder and the re-ranker trained with it (`retrieval train --itm`, see
benchmarks/reranker.sh), on the held-out synthetic split (1,000 images, seed 999) and, when
given, on coco-mini's 80 train2017 photos:

- mirror accuracy: a caption against its scene and the scene with the two shapes swapped, by
  the dual encoder's cosine and by the re-ranker's logit (0.5: a bag of words);
- `retrieval bench --rerank N` rows: exact, hybrid, their "+ rerank@N", and scene-grouped
  text->image recall;
- the ablation, text->image: text only (items ranked by their other captions), image only
  (cosine to the images), late fusion (hybrid, mix 0.2), intermediate fusion (the re-ranker
  over image only's top N).

    python benchmarks/reranker_quality.py --model tiny-vit --pretrained BASE.pt --reranker ITM.pt
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from retrieval.corpus import synthetic
from retrieval.corpus.records import ReadOptions
from retrieval.eval.bench import run_bench
from retrieval.eval.config import BenchConfig
from retrieval.model import reranker as rr
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec


@torch.inference_mode()
def mirror_accuracy(encoder: Encoder, reranker, n: int = 400, seed: int = 999) -> dict:
    captions, own, swapped = synthetic.mirror_pairs(n, seed)
    text = encoder.encode_texts(captions)
    cos_own = (text * encoder.encode_pil(own)).sum(1)
    cos_swapped = (text * encoder.encode_pil(swapped)).sum(1)
    states, mask = encoder.text_states(captions)
    itm_own = reranker(states, mask, encoder.image_patches(own)).numpy()
    itm_swapped = reranker(states, mask, encoder.image_patches(swapped)).numpy()
    return {
        "dual_encoder": float(np.mean(cos_own > cos_swapped)),
        "reranker": float(np.mean(itm_own > itm_swapped)),
    }


def rows(dataset: Path, config: BenchConfig) -> dict[str, dict[str, float]]:
    out = {r.strategy: r.metrics for r in run_bench(dataset, config).rows}
    text_only = run_bench(dataset, replace(config, mix=1.0, rerank=None, group_key=None))
    out["text only (hybrid mix 1)"] = text_only.row("hybrid (mix 1)").metrics
    return {k: {m: round(v, 4) for m, v in ms.items() if "recall@" in m} for k, ms in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-vit")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--reranker", type=Path, required=True)
    ap.add_argument("--rerank", type=int, default=20)
    ap.add_argument("--coco", type=Path, default=None, help="coco-mini captions.json")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    spec = ModelSpec(args.model, args.pretrained)
    encoder = Encoder.load(spec, "cpu")
    reranker = rr.load(args.reranker, encoder.model)
    base = BenchConfig(model=spec, rerank=args.rerank, reranker=args.reranker, progress=False)
    result: dict = {"model": args.model, "pretrained": args.pretrained, "rerank": args.rerank}
    if not args.no_synthetic:
        result["mirror_accuracy"] = mirror_accuracy(encoder, reranker)
        with tempfile.TemporaryDirectory() as tmp:
            held_out = synthetic.generate(Path(tmp), n=1000, seed=999)
            result["synthetic"] = rows(held_out, replace(base, group_key="scene"))
    if args.coco:
        test = replace(base, read=ReadOptions(split="train2017"))
        result["coco-mini"] = rows(args.coco, test)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
