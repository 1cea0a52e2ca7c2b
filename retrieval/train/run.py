"""A training run's folder on disk: its checkpoints, metrics log and config, written atomically.

``checkpoints/epoch_N.pt`` (open_clip-compatible: ``{"epoch", "name", "state_dict"}``) with
``epoch_N.state.pt`` beside it (optimizer, scheduler, step, best score, history); ``latest.pt``
and ``best.pt`` are hard links (or copies) of an epoch's file; ``metrics.jsonl`` has one row per
epoch; ``config.json`` the run's settings; ``skipped.jsonl`` the items left out, and why.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import TrainError
from ..files import atomic_path
from ..model.checkpoints import save_checkpoint

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)


def check_new(out: Path) -> None:
    """Refuse to start a new run where one already is: its checkpoints would be overwritten."""
    found = sorted((out / "checkpoints").glob("*.pt"))
    if found:
        raise TrainError(
            f"{out} already holds a training run ({len(found)} checkpoint files): --resume "
            "continues it; give another --out for a new run"
        )


# What fixes the batches and the schedule: a resume with other values would not continue the run.
_SAME_ON_RESUME = (
    "batch_size",
    "accum_steps",
    "seed",
    "warmup",
    "val_fraction",
    "batch_group",
    "lock_image",
    "lock_text",
)


def check_same_run(out: Path, config: TrainConfig) -> None:
    """Refuse a resume whose settings differ from the run's own (``config.json``)."""
    path = out / "config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    differ = [k for k in _SAME_ON_RESUME if k in saved and saved[k] != getattr(config, k)]
    if differ:
        flags = " ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in differ)
        raise TrainError(
            f"--resume continues the run in {out} as it was started: pass {flags} (its "
            "config.json), or start a new run in another --out"
        )


def fresh(out: Path, config: TrainConfig) -> dict:
    """Start a run folder: write ``config`` (a TrainConfig) and return the state of step 0."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    cfg = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return {"epoch": 0, "step": 0, "best": -1.0, "history": []}


def resume(out: Path, model, optimizer, scheduler, lr: float | None) -> dict:
    """Load ``latest`` into the model, optimizer and scheduler; return the saved state.

    The saved schedule wins, so that a resumed run ends where an uninterrupted one would;
    a different ``lr`` asked for now (None: none asked for) is reported, not applied.
    """
    latest = out / "checkpoints" / "latest.pt"
    if not latest.is_file():
        raise TrainError(f"nothing to resume: no {latest}")
    ckpt = torch.load(latest, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    state = torch.load(latest.with_suffix(".state.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if lr is not None and not math.isclose(saved := scheduler.base_lrs[0], lr):
        log.warning(
            "resuming with the run's own learning rate %g: --lr %g applies to new runs only "
            "(start one from --pretrained %s to change it)",
            saved,
            lr,
            latest,
        )
    return {k: state[k] for k in ("epoch", "step", "best", "history")}


def save(out: Path, model, optimizer, scheduler, state: dict, history, config) -> float:
    """Write epoch N's checkpoint pair, point latest at it, and keep best; return best score."""
    ckpt = out / "checkpoints"
    epoch = state["epoch"]
    name = ckpt / f"epoch_{epoch}.pt"
    save_checkpoint(
        {"epoch": epoch, "name": config.model.name, "state_dict": model.state_dict()}, name
    )
    save_checkpoint(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "step": state["step"],
            "best": state["best"],
            "history": history,
        },
        name.with_suffix(".state.pt"),
    )
    for src, dst in ((name, "latest.pt"), (name.with_suffix(".state.pt"), "latest.state.pt")):
        atomic_copy(src, ckpt / dst)
    log_metrics(out, history[-1])
    new = score(history[-1])
    if new > state["best"]:
        atomic_copy(name, ckpt / "best.pt")
        return new
    return state["best"]


def end_epoch(out: Path, parts, state: dict, history: list, config: TrainConfig, last: bool):
    """Save the epoch just finished when it is the last, a new best or due (``save_every``),
    else only log its row; return the best score. ``parts``: (model, optimizer, scheduler)."""
    validated = any("recall@" in k for k in history[-1])
    better = validated and score(history[-1]) > state["best"]
    if last or better or state["epoch"] % config.save_every == 0:
        return save(out, *parts, state, history, config)
    log_metrics(out, history[-1])
    return state["best"]


def write_skips(out: Path, rows: list[dict]) -> Path:
    """``skipped.jsonl``: the training items left out (repeated ids, unreadable images, no
    caption), one JSON object each with its ``reason``, as a build reports its own."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "skipped.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def log_metrics(out: Path, row: dict) -> None:
    with (out / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def score(row: dict) -> float:
    recalls = [v for k, v in row.items() if "recall@" in k]
    return float(np.mean(recalls)) if recalls else float(row["epoch"])  # no val: newest wins


def atomic_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content atomically: a hard link (no copy) where possible."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(src, tmp)
