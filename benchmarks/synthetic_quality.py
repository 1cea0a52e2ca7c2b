"""Recall@K of a model on a held-out synthetic split, exact search.

The split is generated with a seed the training corpus did not use, so it shares no image with
it. Besides the standard per-image metrics it reports text->image recall counting every image
whose scene matches the caption as correct (the issue's target for the demo model), and
mirror accuracy: how often a caption scores its own scene above the same scene with its two
shapes swapped ("A left of B" against "B left of A"); a bag-of-words model is at 0.5.

    python benchmarks/synthetic_quality.py --model tiny-vit \
        --pretrained retrieval/model/weights/tiny-vit-shapes.pt
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from retrieval.corpus import synthetic
from retrieval.corpus.readers import read_corpus
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec
from retrieval.scoring.metrics import grouped_text_to_image_ranks, recall_at_k, retrieval_metrics


def evaluate(model: str, pretrained: str | None, n: int, seed: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        records = list(read_corpus(synthetic.generate(Path(tmp), n=n, seed=seed)))
        encoder = Encoder.load(ModelSpec(model, pretrained, random_init=not pretrained), "auto")
        images, positions, failures = encoder.encode_image_files([r.image for r in records])
    assert not failures and positions.tolist() == list(range(n))
    texts = [c for r in records for c in r.captions]
    owner = np.array([i for i, r in enumerate(records) for _ in r.captions])
    captions = encoder.encode_texts(texts)
    out = retrieval_metrics(images, captions, owner)
    scenes = np.array([r.extra["scene"] for r in records])
    ranks = grouped_text_to_image_ranks(images, captions, scenes, scenes[owner])
    for k, v in recall_at_k(ranks, (1, 5, 10)).items():
        out[f"scene_image_retrieval_recall@{k}"] = v
    out["mirror_accuracy"] = mirror_accuracy(encoder, n=min(n, 400), seed=seed)
    return {k: round(v, 4) for k, v in out.items()}


def mirror_accuracy(encoder: Encoder, n: int, seed: int) -> float:
    """Share of ``n`` random scenes whose caption scores the scene's image above its mirror's."""
    captions, own, swapped = synthetic.mirror_pairs(n, seed)
    texts = encoder.encode_texts(captions)
    own_s = (texts * encoder.encode_pil(own)).sum(1)
    return float(np.mean(own_s > (texts * encoder.encode_pil(swapped)).sum(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-vit")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--n", type=int, default=1000, help="held-out images")
    ap.add_argument("--seed", type=int, default=999, help="must differ from the training seed")
    args = ap.parse_args()
    print(json.dumps(evaluate(args.model, args.pretrained, args.n, args.seed), indent=2))


if __name__ == "__main__":
    main()
