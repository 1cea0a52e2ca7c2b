"""Which query-layer strategies pay, and what they cost: sweeps on synthetic data and coco-mini.

    python benchmarks/ranking.py --pretrained retrieval/model/weights/tiny-vit-shapes.pt

Quality (exact search, every strategy against plain cosine, Recall@1/5 both ways):
- synthetic: 1,000 held-out images (seed 999), querybank from another 1,000 (seed 998);
- coco-mini: a tiny model trained here on the 159 val2017 photos, evaluated on the 80
  train2017 photos, querybank = the val2017 photos and captions (never the queries).
Querybank normalisation sweeps beta and m; hybrid sweeps the caption weight (mix).

Synthetic rows also report "t2i scene R@K": any image of the caption's scene counts as correct
(identical caption strings recur across images of one scene, so per-image recall with
pessimistic ties penalises any signal that scores those images alike).

Cost: per-query latency at k=10 for each strategy on a built index of the held-out set, as a
ratio to cosine: the query layer alone (embedding computed once outside the timing) and the
whole `Searcher.search` call a user makes (text encoding, index searches, fusion, LMDB).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from quality import COCO_MINI, coco_model  # the sibling script: one coco recipe

from retrieval.corpus import synthetic
from retrieval.corpus.records import ReadOptions
from retrieval.eval import strategies
from retrieval.eval.bench import embed_with_model, load_dataset
from retrieval.eval.config import BenchConfig
from retrieval.index import querybank
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec
from retrieval.query import ranking
from retrieval.query.search import Query, Searcher
from retrieval.scoring import metrics

BETAS, MS, MIXES = (5.0, 10.0, 20.0, 50.0, 100.0), (1, 3, 10, 30), (0.1, 0.2, 0.3, 0.5)


def recalls(t2i, i2t) -> dict[str, float]:
    out = {f"t2i R@{k}": v for k, v in metrics.recall_at_k(t2i, (1, 5)).items()}
    if i2t is not None:
        out |= {f"i2t R@{k}": v for k, v in metrics.recall_at_k(i2t, (1, 5)).items()}
    return out


def sweep(dataset: Path, bank: Path, model: ModelSpec, read: ReadOptions) -> list[dict]:
    config = BenchConfig(model=model, read=read, progress=False)
    records, _ = load_dataset(dataset, config)
    emb, encoder = embed_with_model(records, config)
    bank_images, bank_text = querybank.encode_bank(bank, encoder, read_bank(read))
    t2i, i2t = metrics.retrieval_ranks(emb.image, emb.text, emb.text_to_image)
    scenes = scene_codes(records)
    rows = [{"strategy": "cosine", **recalls(t2i, i2t), **scene_recalls(emb, scenes)}]
    for beta in BETAS:
        for m in MS:
            qb = querybank.BankConfig(beta=beta, m=m)
            ranks = strategies.qbnorm_ranks(
                emb.image,
                emb.text,
                emb.text_to_image,
                querybank.normalisers(emb.image, bank_text, qb),
                querybank.normalisers(emb.text, bank_images, qb),
                beta,
            )
            rows.append({"strategy": f"qbnorm beta={beta:g} m={m}", **recalls(*ranks)})
    for mix in MIXES:
        ranks = strategies.hybrid_ranks(emb.image, emb.text, emb.text_to_image, mix, False)
        grouped = {}
        if scenes is not None:
            g = strategies.hybrid_ranks(emb.image, emb.text, emb.text_to_image, mix, False, scenes)
            grouped = {f"t2i scene R@{k}": v for k, v in metrics.recall_at_k(g, (1, 5)).items()}
        rows.append({"strategy": f"hybrid mix={mix:g}", **recalls(ranks, None), **grouped})
    ranks = strategies.hybrid_ranks(emb.image, emb.text, emb.text_to_image, 0.5, True)
    rows.append({"strategy": "hybrid-rrf", **recalls(ranks, None)})
    return rows


def scene_codes(records) -> np.ndarray | None:
    """(I,) int scene of each synthetic item (any image of the scene answers its captions)."""
    if not all("scene" in r.extra for r in records):
        return None
    return np.unique([r.extra["scene"] for r in records], return_inverse=True)[1]


def scene_recalls(emb, scenes: np.ndarray | None) -> dict[str, float]:
    if scenes is None:
        return {}
    ranks = metrics.grouped_text_to_image_ranks(
        emb.image, emb.text, scenes, scenes[emb.text_to_image]
    )
    return {f"t2i scene R@{k}": v for k, v in metrics.recall_at_k(ranks, (1, 5)).items()}


def read_bank(read: ReadOptions) -> ReadOptions:
    return ReadOptions(split="val2017") if read.split == "train2017" else ReadOptions()


def latency(corpus: Path, model: ModelSpec, tmp: Path, n_queries: int = 200) -> list[dict]:
    encoder = Encoder.load(model)
    build(corpus, "ql", BuildConfig(model=model, progress=False), index_dir=tmp, encoder=encoder)
    texts = [json.loads(line)["captions"][0] for line in corpus.read_text().splitlines()]
    vecs = encoder.encode_texts(texts[:n_queries])
    out = []
    with Searcher.open("ql", tmp, encoder=encoder) as s:
        for strategy in ("cosine", "qbnorm", "hybrid", "hybrid-rrf"):
            options = ranking.Options(k=10, target="images", strategy=strategy)
            times = []
            for v in vecs:
                start = time.perf_counter()
                ranking.run(s.space, [ranking.Term("t", v[None, :])], options)
                times.append(time.perf_counter() - start)
            e2e = []
            for text in texts[:n_queries]:
                start = time.perf_counter()
                s.search(Query(text=text), k=10, strategy=strategy)
                e2e.append(time.perf_counter() - start)
            out.append(
                {
                    "strategy": strategy,
                    "p50_ms": 1e3 * statistics.median(times),
                    "mean_ms": 1e3 * statistics.fmean(times),
                    "e2e_p50_ms": 1e3 * statistics.median(e2e),
                    "e2e_mean_ms": 1e3 * statistics.fmean(e2e),
                }
            )
    base, base_e2e = out[0]["mean_ms"], out[0]["e2e_mean_ms"]
    for row in out:
        row["ratio_to_cosine"] = row["mean_ms"] / base
        row["e2e_ratio_to_cosine"] = row["e2e_mean_ms"] / base_e2e
    return out


def markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "strategy"]
    base = rows[0]
    lines = ["| strategy | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in rows:
        cells = [
            f"{100 * r[k]:.1f}" + ("" if r is base else f" ({100 * (r[k] - base[k]):+.1f})")
            if k in r
            else "-"
            for k in keys
        ]
        lines.append(f"| {r['strategy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True, help="the synthetic (demo) model")
    ap.add_argument("--coco-epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/query_layer"))
    ap.add_argument(
        "--latency-model",
        default=None,
        help="also time fused queries with this open_clip model (random weights), e.g. ViT-B-32",
    )
    ap.add_argument("--latency-only", action="store_true", help="skip the quality sweeps")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = ModelSpec("tiny-vit", args.pretrained)
    report = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        held = synthetic.generate(tmp / "held", n=1000, seed=999)
        if not args.latency_only:
            bank = synthetic.generate(tmp / "bank", n=1000, seed=998)
            report["synthetic"] = sweep(held, bank, shapes, ReadOptions())
            if COCO_MINI.is_dir():
                model = coco_model(tmp / "coco", args.coco_epochs)
                report["coco-mini"] = sweep(
                    COCO_MINI / "captions.json",
                    COCO_MINI / "captions.json",
                    model,
                    ReadOptions(split="train2017"),
                )
        report["latency"] = latency(held, shapes, tmp / "ix")
        if args.latency_model:
            small = synthetic.generate(tmp / "small", n=300, seed=999)
            spec = ModelSpec(args.latency_model, random_init=True)  # speed only
            report[f"latency {args.latency_model}"] = latency(small, spec, tmp / "ix2")
    name = "query_layer_latency" if args.latency_only else "query_layer"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = "\n\n".join(
        f"**{name}**\n\n{markdown(rows)}"
        for name, rows in report.items()
        if not name.startswith("latency")
    )
    for key in (k for k in report if k.startswith("latency")):
        text += f"\n\n**{key} (k=10, text->image)**\n\n" + "\n".join(
            f"- {r['strategy']}: query layer p50 {r['p50_ms']:.2f} ms, mean {r['mean_ms']:.2f} "
            f"ms, {r['ratio_to_cosine']:.2f}x cosine; whole `Searcher.search` (text encoding, "
            f"search, fusion, LMDB) p50 {r['e2e_p50_ms']:.2f} ms, mean {r['e2e_mean_ms']:.2f} "
            f"ms, {r['e2e_ratio_to_cosine']:.2f}x cosine"
            for r in report[key]
        )
    (args.out / f"{name}.md").write_text(text.strip() + "\n")
    print(text)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
