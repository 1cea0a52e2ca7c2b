#!/usr/bin/env bash
# The re-ranker's targets (benchmarks/README.md, "Re-ranker"): a one-stage dual encoder that is a
# bag of words (no curriculum), then the re-ranker trained on its frozen towers with --itm.
# Run from the repository root with .venv/bin on PATH; OUT defaults to /tmp/rr.
set -euo pipefail
OUT=${OUT:-/tmp/rr}
[ -f "$OUT/train/corpus.jsonl" ] || retrieval synth "$OUT/train" -n 8000 --seed 300 --twins
[ -f "$OUT/val/corpus.jsonl" ] || retrieval synth "$OUT/val" -n 500 --seed 200
# The dual encoder, one stage (~10 min on 2 cores): mirror accuracy ~0.5.
[ -f "$OUT/base/checkpoints/best.pt" ] || retrieval train "$OUT/train/corpus.jsonl" --val "$OUT/val/corpus.jsonl" --out "$OUT/base" --model tiny-vit \
    --random-init --epochs 10 --batch-size 128 --lr 1e-3 --warmup 50 --batch-group pair --no-progress
# The re-ranker alone, on the frozen dual encoder (only it and the logit scale learn).
retrieval train "$OUT/train/corpus.jsonl" --val "$OUT/val/corpus.jsonl" --out "$OUT/itm" --model tiny-vit \
    --pretrained "$OUT/base/checkpoints/best.pt" --lock-image 0 --lock-text 0 --itm \
    --epochs ${ITM_EPOCHS:-20} --batch-size 128 --lr 1e-3 --warmup 100 --batch-group pair --no-progress
