"""The quality guard of the runtimes: Recall@K and cosine to torch fp32, per runtime and model.

From the repository root:

    .venv/bin/python benchmarks/runtime_quality.py --json benchmarks/results/runtime_quality.json

`retrieval bench --runtime-rows` (exact search, pessimistic ties) on every trained model here:

- the demo model (``tiny-vit-shapes.pt``) on 1,000 held-out synthetic images (seed 999, as
  ``synthetic_quality.py``), 3,000 captions;
- effnet-minilm as shipped (projections trained on coco-mini's 159 val2017 photos; MiniLM's
  pretrained text tower, EfficientNet-Lite0's image trunk) on the 80 held-out train2017 photos,
  and on all 239 photos (1,195 captions).

int8 may become the CPU default for ``build`` only if it costs <= 0.5 points of R@1, both ways,
on every row (``MAX_R1_LOSS``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from machine import describe

from retrieval.corpus import synthetic
from retrieval.corpus.records import ReadOptions
from retrieval.eval.bench import run_bench
from retrieval.eval.config import BenchConfig
from retrieval.model.spec import ModelSpec, demo_model

ROOT = Path(__file__).resolve().parents[1]
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini" / "captions.json"
MAX_R1_LOSS = 0.005
R1 = ("image_retrieval_recall@1", "text_retrieval_recall@1")
KEYS = [f"{d}_recall@{k}" for d in ("image_retrieval", "text_retrieval") for k in (1, 5, 10)]


def cases(tmp: Path) -> dict[str, tuple[ModelSpec, Path, ReadOptions]]:
    shapes = synthetic.generate(tmp / "shapes", n=1000, seed=999)
    effnet = ModelSpec("effnet-minilm")
    return {
        "demo model, synthetic held-out": (demo_model(), shapes, ReadOptions()),
        "effnet-minilm, coco-mini held-out (80)": (
            effnet,
            COCO_MINI,
            ReadOptions(split="train2017"),
        ),
        "effnet-minilm, coco-mini all (239)": (effnet, COCO_MINI, ReadOptions()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results, worst = {}, 0.0
    with tempfile.TemporaryDirectory(prefix="runtime-quality-") as name:
        for label, (spec, data, read) in cases(Path(name)).items():
            config = BenchConfig(model=spec, read=read, runtime_rows=True, progress=False)
            rows = {r.strategy: r.metrics for r in run_bench(data, config).rows}
            results[label] = {k: v for k, v in rows.items() if k.startswith("exact [")}
    print(
        "| model, data | runtime | T2I R@1 / 5 / 10 | I2T R@1 / 5 / 10 | image cos mean / min "
        "| text cos mean / min |"
    )
    print("|---|---|---|---|---|---|")
    for label, rows in results.items():
        base = rows["exact [torch fp32]"]
        for runtime, m in rows.items():
            worst = max([worst] + [base[k] - m[k] for k in R1])
            t2i, i2t = (" / ".join(f"{100 * m[k]:.1f}" for k in KEYS[i : i + 3]) for i in (0, 3))
            cos = [f"{m[f'{kind}_cosine_mean']:.4f} / {m[f'{kind}_cosine_min']:.4f}"
                   for kind in ("image", "text")]  # fmt: skip
            print(f"| {label} | {runtime[7:-1]} | {t2i} | {i2t} | {cos[0]} | {cos[1]} |")
    verdict = "may be the default" if worst <= MAX_R1_LOSS else "stays opt-in"
    print(f"\nworst R@1 loss of any runtime: {100 * worst:.1f} points -> int8 {verdict}")
    if args.json:
        report = {"machine": describe(), "results": results, "worst_r1_loss": worst}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
