#!/usr/bin/env bash
# More re-ranker runs (benchmarks/README.md, "Re-ranker"), after benchmarks/reranker.sh:
# a re-ranker for the shipped demo model, one for effnet-minilm on coco-mini, and hard-negative
# batches against --batch-group and plain batches. Run from the repository root, .venv/bin on PATH.
set -euo pipefail
OUT=${OUT:-/tmp/rr}
COCO=${COCO:-../shared/data/coco-mini/captions.json}
# The bag-of-words base again, its re-ranker trained on the same 8,000 images with the two part
# captions added to each ("a red circle on the left"): one stage, no curriculum.
[ -f "$OUT/train-parts/corpus.jsonl" ] || retrieval synth "$OUT/train-parts" -n 8000 --seed 300 --twins --parts
[ -f "$OUT/itm-parts/checkpoints/latest.pt" ] || retrieval train "$OUT/train-parts/corpus.jsonl" --val "$OUT/val/corpus.jsonl" --out "$OUT/itm-parts" --model tiny-vit \
    --pretrained "$OUT/base/checkpoints/best.pt" --lock-image 0 --lock-text 0 --itm \
    --epochs ${PARTS_EPOCHS:-12} --batch-size 128 --lr 1e-3 --warmup 100 --batch-group pair --no-progress
# The demo model's towers frozen, its re-ranker trained on the demo's own stage-2 corpus.
[ -f "$OUT/demo-itm/checkpoints/latest.pt" ] || retrieval train "$OUT/train/corpus.jsonl" --val "$OUT/val/corpus.jsonl" --out "$OUT/demo-itm" --model tiny-vit \
    --pretrained retrieval/model/weights/tiny-vit-shapes.pt --lock-image 0 --lock-text 0 --itm \
    --epochs ${DEMO_EPOCHS:-8} --batch-size 128 --lr 1e-3 --warmup 100 --batch-group pair --no-progress
# effnet-minilm (shipped coco weights) frozen, re-ranker trained on coco-mini's 159 val2017 photos.
if [ -f "$COCO" ]; then
  retrieval train "$COCO" --split val2017 --out "$OUT/coco-itm" --model effnet-minilm \
      --lock-image 0 --lock-text 0 --itm --all-captions --epochs ${COCO_EPOCHS:-5} --batch-size 64 \
      --lr 1e-3 --warmup 20 --no-progress
fi
# Batches: plain, --batch-group pair, --hard-negatives 2 (tiny-vit from scratch, 4,000 twins).
retrieval synth "$OUT/hn" -n 4000 --seed 300 --twins
for how in plain group hard; do
  case $how in plain) flag=();; group) flag=(--batch-group pair);; hard) flag=(--hard-negatives 2);; esac
  retrieval train "$OUT/hn/corpus.jsonl" --val "$OUT/val/corpus.jsonl" --out "$OUT/hn-$how" --model tiny-vit \
      --random-init --epochs 6 --batch-size 128 --lr 1e-3 --warmup 50 "${flag[@]}" --no-progress
done
