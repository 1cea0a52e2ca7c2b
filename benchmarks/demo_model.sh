#!/usr/bin/env bash
# How the demo model (retrieval/model/weights/tiny-vit-shapes.pt, 14 MB fp16) was trained: by
# `retrieval train` in two stages, a scene and its mirror always in one batch; ~26 min on 2 cores
# (benchmarks/README.md, "Quality"). Run from the repository root with .venv/bin on PATH.
set -euo pipefail
retrieval synth /tmp/cur-s1 -n 8000 --seed 100 --twins --relations "left of,above"
retrieval synth /tmp/cur-s2 -n 8000 --seed 300 --twins
retrieval synth /tmp/syn-val -n 500 --seed 200
retrieval train /tmp/cur-s1/corpus.jsonl --val /tmp/syn-val/corpus.jsonl --out /tmp/cur-run1 --model tiny-vit \
    --random-init --epochs 10 --batch-size 128 --lr 1e-3 --warmup 50 --batch-group pair          # ~9 min
retrieval train /tmp/cur-s2/corpus.jsonl --val /tmp/syn-val/corpus.jsonl --out /tmp/cur-run2 --model tiny-vit \
    --pretrained /tmp/cur-run1/checkpoints/latest.pt \
    --epochs 20 --batch-size 128 --lr 1e-3 --warmup 50 --batch-group pair          # ~17 min
retrieval export /tmp/cur-run2/checkpoints/best.pt retrieval/model/weights/tiny-vit-shapes.pt
# Its re-ranker (#23): towers frozen, trained with --itm on the stage-2 corpus (~7 min), exported
# into the same file with the stage-2 logit scale put back (the dual encoder stays bit for bit).
cp retrieval/model/weights/tiny-vit-shapes.pt /tmp/dual.pt
retrieval train /tmp/cur-s2/corpus.jsonl --val /tmp/syn-val/corpus.jsonl --out /tmp/cur-itm --model tiny-vit \
    --pretrained /tmp/dual.pt --lock-image 0 --lock-text 0 --itm \
    --epochs 8 --batch-size 128 --lr 1e-3 --warmup 100 --batch-group pair          # ~7 min
retrieval export /tmp/cur-itm/checkpoints/best.pt retrieval/model/weights/tiny-vit-shapes.pt
python - <<'PY'
import torch
from pathlib import Path
from retrieval.model.checkpoints import save_checkpoint
out = Path("retrieval/model/weights/tiny-vit-shapes.pt")
ckpt = torch.load(out, weights_only=True)
ckpt["state_dict"]["logit_scale"] = torch.load("/tmp/dual.pt", weights_only=True)["state_dict"]["logit_scale"]
save_checkpoint(ckpt, out)
PY
