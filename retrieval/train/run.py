"""A training run's folder on disk: its checkpoints, metrics log and config, written atomically.

``checkpoints/epoch_N.pt`` (open_clip-compatible: ``{"epoch", "name", "state_dict"}``; partial,
with ``"partial"``, for a locked tower model: see `retrieval.model.checkpoints`) with
``epoch_N.state.pt`` beside it (optimizer, scheduler and a `RunState`); ``latest.pt`` and
``best.pt`` are hard links (or copies) of an epoch's file; ``metrics.jsonl`` has one row per
epoch; ``config.json`` the run's settings; ``skipped.jsonl`` the items left out, and why.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import TrainError
from ..files import atomic_path, atomic_write
from ..model.checkpoints import (
    RERANKER,
    is_partial,
    load_partial,
    partial_checkpoint,
    save_checkpoint,
)
from ..model.reranker import payload
from .config import DEFAULT_LR

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunState:
    """Where a training run stands at the end of an epoch; a new one is made for each epoch.

    ``best`` is the best `score` of a saved epoch (the one ``best.pt`` holds; -1 before any),
    ``history`` one metrics row per epoch (``{"epoch", "step", "samples_per_s", "val_..."}``).
    """

    epoch: int = 0
    step: int = 0
    best: float = -1.0
    history: tuple[dict, ...] = ()

    def after(self, row: dict) -> RunState:
        """The state once the epoch that ``row`` reports (its ``epoch`` and ``step``) ends."""
        return replace(self, epoch=row["epoch"], step=row["step"], history=(*self.history, row))

    def to_dict(self) -> dict:
        """What ``epoch_N.state.pt`` stores of it, beside the optimizer and scheduler."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "history": list(self.history),
        }

    @classmethod
    def from_dict(cls, saved: dict) -> RunState:
        """Read back `to_dict`'s keys from a ``.state.pt`` (other keys are ignored).

        A state file always belongs to a saved epoch, so its best includes that epoch's score:
        files written before that rule stored the best from before it.
        """
        history = tuple(saved["history"])
        best = float(saved["best"])
        if history:
            best = max(best, score(history[-1]))
        return cls(epoch=int(saved["epoch"]), step=int(saved["step"]), best=best, history=history)


def sweep_temporaries(out: Path) -> None:
    """Remove the temporary files a killed run left (each may be a whole checkpoint)."""
    for tmp in (out / "checkpoints").glob("*.tmp"):  # pathlib's * matches leading dots too
        tmp.unlink(missing_ok=True)


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
    "hard_negatives",
    "lock_image",
    "lock_text",
    "all_captions",
    "augment_views",
    "itm",
    "itm_random",
    "wd",  # the saved optimizer's, which a resume restores: a new value would be ignored
)


def check_same_run(out: Path, config: TrainConfig) -> None:
    """Refuse a resume whose settings differ from the run's own (``config.json``)."""
    path = out / "config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    differ = [k for k in _SAME_ON_RESUME if k in saved and saved[k] != getattr(config, k)]
    run_lr = DEFAULT_LR if saved.get("lr") is None else saved["lr"]
    if "lr" in saved and config.lr is not None and not math.isclose(config.lr, run_lr):
        saved["lr"] = run_lr  # None (as given) is the run's own: only a new value differs
        differ.append("lr")
    if differ:
        flags = ", ".join(
            f"--{k.replace('_', '-')} {saved[k]}" if saved[k] is not None else f"no --{k}"
            for k in differ
        )
        raise TrainError(
            f"--resume continues the run in {out} as it was started: pass {flags} (its "
            "config.json), or start a new run in another --out"
        )


def fresh(out: Path, config: TrainConfig) -> RunState:
    """Start a run folder: write ``config`` (a TrainConfig) and return the state of step 0."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out)
    cfg = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    with atomic_write(out / "config.json", "w", encoding="utf-8") as f:
        f.write(json.dumps(cfg, indent=2, default=str))
    return RunState()


def resume(out: Path, model, optimizer, scheduler, reranker, lr: float | None) -> RunState:
    """Load ``latest`` into the model, optimizer, scheduler and re-ranker (None: the run has
    none); return the saved state.

    The saved schedule wins, so that a resumed run ends where an uninterrupted one would;
    a different ``lr`` asked for now (None: none asked for) is reported, not applied.
    """
    latest = out / "checkpoints" / "latest.pt"
    if not latest.is_file():
        raise TrainError(f"nothing to resume: no {latest}")
    sweep_temporaries(out)
    ckpt = torch.load(latest, map_location="cpu", weights_only=True)
    if is_partial(ckpt):
        load_partial(model, ckpt, latest)
    else:
        model.load_state_dict(ckpt["state_dict"])
    if reranker is not None:
        reranker.load_state_dict(ckpt[RERANKER]["state_dict"])
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
    return RunState.from_dict(state)


def save(
    out: Path, model, optimizer, scheduler, reranker, state: RunState, config, keep=None
) -> RunState:
    """Write epoch N's checkpoint pair, point latest at it, and keep best; return the state
    with its best score, as saved (a resume compares the next epochs with it).

    ``reranker``: saved with the weights it belongs to (None: none); ``keep``: the state-dict
    keys to write (a partial checkpoint), or None for all.
    """
    ckpt = out / "checkpoints"
    name = ckpt / f"epoch_{state.epoch}.pt"
    new = score(state.history[-1])
    better = new > state.best
    state = replace(state, best=new) if better else state
    fields = {"epoch": state.epoch, "name": config.model.name}
    if keep is None:
        weights = fields | {"state_dict": model.state_dict()}
    else:
        weights = partial_checkpoint(model, keep, **fields)
    if reranker is not None:
        weights[RERANKER] = payload(reranker, model)
    save_checkpoint(weights, name)
    save_checkpoint(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        | state.to_dict(),
        name.with_suffix(".state.pt"),
    )
    if better:  # before latest: a resume from the epoch before redoes this one whole
        atomic_copy(name, ckpt / "best.pt")
    for src, dst in ((name, "latest.pt"), (name.with_suffix(".state.pt"), "latest.state.pt")):
        atomic_copy(src, ckpt / dst)
    log_metrics(out, state.history[-1])
    return state


def end_epoch(
    out: Path, parts, state: RunState, config: TrainConfig, last: bool, keep=None
) -> RunState:
    """Save the epoch just finished (``state.history[-1]``) when it is the last, a new best or
    due (``save_every``), else only log its row. ``parts``: (model, optimizer, scheduler,
    reranker or None);
    ``keep``: as `save`'s."""
    row = state.history[-1]
    validated = any("recall@" in k for k in row)
    better = validated and score(row) > state.best
    if last or better or state.epoch % config.save_every == 0:
        return save(out, *parts, state, config, keep)
    log_metrics(out, row)
    return state


def write_skips(out: Path, rows: list[dict]) -> Path:
    """``skipped.jsonl``: the training items left out (repeated ids, unreadable images, no
    caption), one JSON object each with its ``reason``, as a build reports its own."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "skipped.jsonl"
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def log_metrics(out: Path, row: dict) -> None:
    """Append ``row`` to ``metrics.jsonl``: a log that grows by a line per epoch, also for the
    epochs without a checkpoint, so it is appended to rather than rewritten whole."""
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
