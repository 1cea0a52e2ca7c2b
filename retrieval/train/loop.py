"""`retrieval train`: contrastive fine-tuning of an open_clip model on a corpus.

One process, or many under torchrun (DDP, features all-gathered with gradients). One optimizer
step sees ``batch_size * accum_steps`` pairs per process, ``* world size`` in all; the loss is
computed over all of them at once (gradient caching embeds them in chunks), so the step is the
same whatever the number of processes, micro-batches or chunks.

Each epoch visits every training image at most once (those left over after the last whole step
sit it out), in an order drawn from (seed, epoch), with one of its captions drawn the same way:
a batch never holds the same image twice, and a resumed run sees exactly the batches an
uninterrupted one would.

Output folder: see `retrieval.train.run` (``best.pt`` is the best mean validation recall),
plus ``cache/`` (the decoded training pixels). A loss that turns NaN or infinite stops the run
before the step reaches the weights, so the checkpoints already saved stay usable.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..corpus.filters import check_field
from ..corpus.readers import read_corpus
from ..corpus.records import unique_records
from ..errors import TrainError
from ..model.distributed import World
from ..model.distributed import join as join_world
from ..model.encoder import Encoder, default_workers
from .config import DEFAULT_LR, TrainConfig
from .gradcache import contrastive_step
from .loss import clamp_logit_scale
from .run import RunState, check_new, check_same_run, end_epoch, fresh, resume, write_skips
from .trainset import TrainSet, load_trainset, split_records

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    out: Path
    steps: int
    best: Path | None
    latest: Path
    history: list[dict]
    samples_per_s: float


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's rule: no weight decay on biases, norms, gains and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale"))
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]


def lr_lambda(total: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def epoch_batches(
    n: int, epoch: int, seed: int, size: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(steps, size) item indices of each step, and one caption draw (n,) per item; last drops.

    ``groups`` (n,) int: items of one group are laid out next to each other (groups and the
    items within each in random order), so they share a batch unless a boundary splits them.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    draws = rng.random(n)
    if groups is not None:
        rank = rng.permutation(int(groups.max()) + 1 if n else 0)[groups[order]]
        order = order[np.argsort(rank, kind="stable")]
    steps = n // size
    return order[: steps * size].reshape(steps, size), draws


def train(corpus: str | Path, out: str | Path, config: TrainConfig | None = None) -> TrainResult:
    """Fine-tune ``config.model`` on ``corpus``; write checkpoints under ``out``."""
    config, out = config or TrainConfig(), Path(out)
    if config.resume:
        check_same_run(out, config)  # before minutes of decoding
    else:
        check_new(out)  # before anything is written into it
        config = replace(config, lr=DEFAULT_LR if config.lr is None else config.lr)
    world, device = join_world(config.device)
    torch.manual_seed(config.seed)
    spec, latest = config.model, out / "checkpoints" / "latest.pt"
    # Resuming: load the weights the run goes on from (no "random weights" warning, no need for
    # a base checkpoint since moved). Not in place of an open_clip tag, whose preprocessing
    # (mean, std, resize) a plain file would not carry.
    if config.resume and latest.is_file() and not spec.is_tag:
        spec = replace(spec, pretrained=str(latest))
    encoder = Encoder.load(spec, device)
    model = encoder.model
    _lock(model, config)
    train_set, val_set = _datasets(corpus, out, config, encoder, world)
    per_step = config.batch_size * config.accum_steps * world.size
    steps_per_epoch = len(train_set) // per_step
    if steps_per_epoch == 0:
        raise TrainError(
            f"{len(train_set)} usable training pairs cannot fill one step of "
            f"{per_step} (batch size x accum steps x processes); lower --batch-size"
        )
    total = config.steps or config.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    optimizer = _adamw(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, config.warmup))
    state = _start(out, config, (model, optimizer, scheduler), total)
    ddp = _wrap(model, world, device)
    speed = []
    for epoch in range(state.epoch + 1, epochs + 1):
        step, rate = _run_epoch(
            ddp, model, optimizer, scheduler, train_set, config, world, epoch, state.step, total
        )
        speed.append(rate)
        if world.rank == 0:  # the only one that validates and writes
            row = {"epoch": epoch, "step": step, "samples_per_s": round(rate, 1)}
            if val_set is not None:
                row |= val_set.evaluate(model, encoder.device)
            last = step >= total or epoch == epochs
            parts = model, optimizer, scheduler
            state = end_epoch(out, parts, state.after(row), config, last)
        else:
            state = replace(state, epoch=epoch, step=step)
        if world.size > 1:
            dist.barrier()
        if step >= total:
            break
    ckpt = out / "checkpoints"
    best = ckpt / "best.pt" if (ckpt / "best.pt").exists() else None
    rate = float(np.mean(speed)) if speed else 0.0
    return TrainResult(out, state.step, best, ckpt / "latest.pt", list(state.history), rate)


def _start(out: Path, config: TrainConfig, parts, total: int) -> RunState:
    """The state to go on from: the run's saved one on resume, else a new run folder's."""
    if not config.resume:
        return fresh(out, config)
    state = resume(out, *parts, config.lr)
    if state.step >= total:
        raise TrainError(
            f"the run in {out} has made all its {total} steps; give more --epochs or --steps "
            "to train on"
        )
    return state


def _adamw(model, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.wd)
    lr = DEFAULT_LR if config.lr is None else config.lr  # on resume, the saved state replaces it
    try:  # the same update in one kernel: tiny-vit on a CPU 4.5 ms a step instead of 30
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or torch without it
        return torch.optim.AdamW(groups, lr=lr)


def _lock(model, config: TrainConfig) -> None:
    if config.lock_image is not None:
        model.lock_image_tower(unlocked_groups=config.lock_image)
    if config.lock_text is not None:
        model.lock_text_tower(unlocked_layers=config.lock_text)
    model.train()


def _datasets(corpus, out: Path, config: TrainConfig, encoder, world: World):
    records, skipped = unique_records(read_corpus(corpus, config.read))
    if config.batch_group:
        check_field(records, config.batch_group)  # before minutes of decoding, not after
    if config.val is not None:
        val_records, _ = unique_records(read_corpus(config.val, config.read))
    else:
        records, val_records = split_records(records, config.val_fraction, config.seed)
    workers = default_workers() if config.workers is None else config.workers
    show = config.progress and world.rank == 0

    def load(recs, name):
        if world.rank != 0 and world.size > 1:
            dist.barrier()  # rank 0 decodes; the others then read its cache
        ts = load_trainset(recs, encoder, out / "cache", workers, show, config.batch_group)
        if world.rank == 0 and world.size > 1:
            dist.barrier()
        log.info("%s: %d usable pairs, %d items skipped", name, len(ts), len(ts.skipped))
        return ts

    train_set = load(records, "train")
    val_set = load(val_records, "validation") if val_records else None
    rows = [{"id": i, "path": p, "reason": why} for i, p, why in skipped]
    rows += [{"id": i, "reason": why} for i, why in train_set.skipped]
    rows += [
        {"id": i, "reason": why, "set": "validation"} for i, why in getattr(val_set, "skipped", [])
    ]
    if world.rank == 0:  # written even when empty: a resumed run's report must not be stale
        report = write_skips(out, rows)
        if rows:
            log.warning("skipped %d items: each, with its reason, in %s", len(rows), report)
    return train_set, val_set


def _wrap(model, world: World, device: str):
    if world.size == 1:
        return model
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _amp(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext, None
    bf16 = torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = None if bf16 else torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _run_epoch(
    ddp,
    model,
    optimizer,
    scheduler,
    data: TrainSet,
    config: TrainConfig,
    world: World,
    epoch: int,
    step: int,
    total: int,
) -> tuple[int, float]:
    device = next(model.parameters()).device
    autocast, scaler = _amp(device)
    per_step = config.batch_size * config.accum_steps
    size = per_step * world.size
    batches, draws = epoch_batches(len(data), epoch, config.seed, size, data.groups)
    chunk = min(config.chunk_size or config.batch_size, config.batch_size)
    if config.accum_steps == 1 and chunk >= config.batch_size:
        chunk = None
    bar = tqdm(
        total=min(len(batches), total - step),
        desc=f"epoch {epoch}",
        unit="step",
        disable=not (config.progress and world.rank == 0),
    )
    start, seen = time.perf_counter(), 0
    for idx in batches:
        if step >= total:
            break
        local = idx[world.rank * per_step : (world.rank + 1) * per_step]
        images, tokens, cap_ids = data.batch(local, draws, device)
        optimizer.zero_grad(set_to_none=True)
        loss = contrastive_step(
            ddp,
            images,
            tokens,
            cap_ids,
            chunk,
            world,
            autocast,
            scaler.scale if scaler else (lambda x: x),
        )
        if scaler is None:  # with fp16, GradScaler itself skips a non-finite step
            _check_finite(loss, step, epoch)
        _optimizer_step(model, optimizer, scaler, config.grad_clip)
        scheduler.step()
        clamp_logit_scale(model.logit_scale)
        step += 1
        seen += len(idx)
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(
            loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", samples_s=f"{rate:.0f}"
        )
        bar.update(1)
    bar.close()
    return step, seen / max(time.perf_counter() - start, 1e-9)


def _check_finite(loss: float, step: int, epoch: int) -> None:
    """Stop before a NaN/inf step reaches the weights, so the checkpoints already saved stay good.

    Every process stops together: a non-finite feature anywhere reaches every process's
    logits through the all-gather (image rows one way, text rows the other).
    """
    if not math.isfinite(loss):
        raise TrainError(
            f"training diverged: the loss became {loss} at step {step + 1} (epoch {epoch}); the "
            "checkpoints saved before it are unchanged: start a new run (another --out) from "
            "--pretrained OUT/checkpoints/latest.pt with a lower --lr"
        )


def _optimizer_step(model, optimizer, scaler, grad_clip: float | None) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], grad_clip
        )
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
