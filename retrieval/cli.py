"""The `retrieval` command: parse, call one library function, print."""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import click

from .data import FORMATS
from .errors import RetrievalError
from .layout import ENV_INDEX_DIR
from .query import STRATEGIES

_MODEL_HELP = (
    "open_clip model name (e.g. ViT-B-32), a shipped config (tiny-vit, small-vit) or a path to "
    "an open_clip model-config JSON. Default: tiny-vit."
)
_PRETRAINED_HELP = "open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a local checkpoint file."


class _Group(click.Group):
    """Turns the engine's errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (RetrievalError, FileNotFoundError, FileExistsError, ValueError) as e:
            raise click.ClickException(str(e)) from None


def _index_dir_option(f):
    return click.option(
        "--index-dir",
        type=click.Path(path_type=Path),
        envvar=ENV_INDEX_DIR,
        default=Path("indexes"),
        show_default=True,
        help=f"Folder holding the indexes (env: {ENV_INDEX_DIR}).",
    )(f)


def _model_options(default_model: str | None):
    def wrap(f):
        f = click.option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ..."
        )(f)
        f = click.option("--pretrained", default=None, help=_PRETRAINED_HELP)(f)
        return click.option("--model", default=default_model, help=_MODEL_HELP)(f)

    return wrap


def _read_options(f):
    """Corpus-reading options, handed to the command as one ``read`` (a ReadOptions)."""

    @functools.wraps(f)
    def wrapper(*args, **kw):
        from .data import ReadOptions

        keys = ("fmt", "image_col", "caption_col", "id_col", "image_root", "split", "split_file")
        values = [kw.pop(k) for k in keys]
        return f(*args, read=ReadOptions(*values), **kw)

    opts = [
        click.option(
            "--format",
            "fmt",
            type=click.Choice(FORMATS),
            default=None,
            help="Corpus format [autodetected].",
        ),
        click.option(
            "--image-col", default="filepath", show_default=True, help="CSV image column."
        ),
        click.option(
            "--caption-col", default="title", show_default=True, help="CSV caption column."
        ),
        click.option("--id-col", default=None, help="CSV id column [the image path]."),
        click.option(
            "--image-root",
            type=click.Path(path_type=Path),
            default=None,
            help="Resolve relative image paths here [the corpus file's folder].",
        ),
        click.option(
            "--split",
            default=None,
            help="Only records whose split field is this (e.g. test).",
        ),
        click.option(
            "--split-file",
            type=click.Path(exists=True, path_type=Path),
            default=None,
            help="Flickr8k: file listing the images to keep.",
        ),
    ]
    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


@click.group(cls=_Group)
@click.version_option(package_name="retrieval")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Search images by text and text by image: train, build, search, measure."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("corpus", type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="Name of the index to create or replace.")
@_model_options("tiny-vit")
@click.option(
    "--index",
    "index",
    default="auto",
    show_default=True,
    help="auto (exact below 100k vectors, HNSW above) or a FAISS factory string.",
)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--workers", type=int, default=None, help="Image-decoding processes [cores-1].")
@click.option(
    "--max-pixels",
    default=40_000_000,
    show_default=True,
    help="Refuse images with more pixels (decompression bombs).",
)
@click.option(
    "--bank",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Querybank corpus for qbnorm [the corpus's own captions and images].",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@_read_options
@_index_dir_option
def build(corpus, name, model, pretrained, no_progress, index_dir, **options):
    """Build index NAME from CORPUS (any format: see --format)."""
    from .build import BuildConfig
    from .build import build as run_build
    from .encoder import ModelSpec

    # The other options are named after their BuildConfig fields.
    config = BuildConfig(model=ModelSpec(model, pretrained), progress=not no_progress, **options)
    report = run_build(corpus, name, config, index_dir=index_dir)
    click.echo(report.summary())
    if sum(report.skipped.values()):
        click.echo(f"skipped records and their reasons: {report.path / 'skipped.jsonl'}")


@main.command()
@click.argument("name")
@click.option("--text", default=None, help="Text query.")
@click.option("--image", type=click.Path(path_type=Path), default=None, help="Image query file.")
@click.option(
    "--image-weight",
    default=0.5,
    show_default=True,
    help="With both --text and --image: the image's weight (the text gets 1 - it).",
)
@click.option(
    "--term",
    "terms",
    multiple=True,
    metavar="KIND:WEIGHT:VALUE",
    help="Extra term, e.g. text:-0.5:blurry or image:0.3:ref.jpg (repeatable).",
)
@click.option("-k", "k", default=10, show_default=True, help="Number of results.")
@click.option(
    "--target",
    type=click.Choice(["images", "captions"]),
    default=None,
    help="What to match [text or composed: images; image alone: captions].",
)
@click.option(
    "--strategy",
    type=click.Choice(STRATEGIES),
    default=None,
    help="How signals are fused [the index's default for the target].",
)
@click.option(
    "--where",
    multiple=True,
    metavar="COND",
    help="Metadata condition: key=value, key!=value, key>=n, key<n, key=lo..hi.",
)
@click.option("--overfetch", default=10, show_default=True, help="Candidates per signal: x k.")
@click.option(
    "--mix", default=0.2, show_default=True, help="hybrid: weight of the other modality's signal."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--grid",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the results as a contact sheet (PNG): thumbnails, rank, score, caption.",
)
@_model_options(None)
@_index_dir_option
def search(name, text, image, image_weight, terms, as_json, grid, model, pretrained, **options):
    """Search index NAME by --text, --image, or both (and more --term)."""
    from .encoder import ModelSpec
    from .search import Query
    from .search import search as run_search

    terms = tuple(_parse_term(t) for t in terms)
    query = Query(text=text, image=image, image_weight=image_weight, terms=terms)
    if not query.all_terms():
        raise click.UsageError("give --text, --image or both")
    spec = ModelSpec(model, pretrained) if model else None
    # The other options are named after Searcher.search's keywords (and index_dir, device).
    out = run_search(name, query, model=spec, **options)
    click.echo(json.dumps(out, ensure_ascii=False, indent=2) if as_json else _table(out))
    if grid is not None:
        from .grid import contact_sheet

        click.echo(f"contact sheet: {contact_sheet(out['results'], grid)}", err=as_json)


@main.command()
@click.argument("name")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True)
@click.option(
    "--max-upload-mb", default=10.0, show_default=True, help="Largest request body accepted."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@_index_dir_option
def serve(name, host, port, max_upload_mb, device, index_dir):
    """Serve index NAME over HTTP: a search page at / and a JSON API (docs at /docs)."""
    from .serve import ServeConfig
    from .serve import serve as run_server

    config = ServeConfig(max_upload_bytes=int(max_upload_mb * 2**20))
    run_server(name, index_dir, host=host, port=port, device=device, config=config)


def _parse_term(text: str):
    from .search import QueryTerm

    kind, _, rest = text.partition(":")
    weight, _, value = rest.partition(":")
    try:
        w = float(weight)
    except ValueError:
        w = None
    if kind not in ("text", "image") or w is None or not value:
        raise click.BadParameter(
            f"{text!r}: use text:WEIGHT:words or image:WEIGHT:path", param_hint="--term"
        )
    return QueryTerm(text=value, weight=w) if kind == "text" else QueryTerm(image=value, weight=w)


def _table(out: dict) -> str:
    lines = [f"{'rank':>4}  {'score':>7}  {'id':<24}  caption"]
    for r in out["results"]:
        caption = r["caption"]["text"] if "caption" in r else (r["captions"] or [""])[0]
        lines.append(f"{r['rank']:>4}  {r['score']:>7.4f}  {r['id']:<24}  {caption[:70]}")
    if not out["results"]:
        lines.append("(no results)")
    return "\n".join(lines)


@main.command()
@click.argument("corpus", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output folder: checkpoints, metrics, decoded-image cache.",
)
@_model_options("tiny-vit")
@click.option("--epochs", default=10, show_default=True)
@click.option("--steps", type=int, default=None, help="Total optimizer steps (overrides --epochs).")
@click.option(
    "--batch-size", default=128, show_default=True, help="Pairs per process per micro-batch."
)
@click.option(
    "--chunk-size",
    type=int,
    default=None,
    help="Gradient caching: embed at most this many pairs at once [whole batch].",
)
@click.option(
    "--accum-steps",
    default=1,
    show_default=True,
    help="Micro-batches per optimizer step, all in one contrastive loss.",
)
@click.option("--lr", default=5e-4, show_default=True)
@click.option("--wd", default=0.1, show_default=True, help="Weight decay (not on gains/biases).")
@click.option("--warmup", default=50, show_default=True, help="Warm-up steps before cosine decay.")
@click.option("--grad-clip", type=float, default=None, help="Clip the gradient norm to this.")
@click.option(
    "--lock-image",
    type=int,
    default=None,
    metavar="N",
    help="Freeze the image tower but its last N layer groups.",
)
@click.option(
    "--lock-text",
    type=int,
    default=None,
    metavar="N",
    help="Freeze the text tower but its last N layers.",
)
@click.option("--seed", default=0, show_default=True, help="Data order and caption draws.")
@click.option(
    "--val",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Validation corpus (Recall@K every epoch; best checkpoint kept).",
)
@click.option(
    "--val-fraction",
    default=0.0,
    show_default=True,
    help="Hold out this fraction of the items for validation.",
)
@click.option("--workers", type=int, default=None, help="Image-decoding processes [cores-1].")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/latest.pt.")
@click.option(
    "--batch-group",
    default=None,
    metavar="FIELD",
    help="Keep items with equal values of metadata FIELD in one batch (hard negatives).",
)
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@_read_options
def train(corpus, out, model, pretrained, no_progress, read, **options):
    """Fine-tune (or train from scratch) a CLIP model on CORPUS with a contrastive loss.

    Several processes: torchrun --nproc_per_node N -m retrieval.cli train ...
    """
    from .encoder import ModelSpec
    from .train import TrainConfig
    from .train import train as run_train

    # Every other option is named after its TrainConfig field.
    config = TrainConfig(
        model=ModelSpec(model, pretrained), progress=not no_progress, read=read, **options
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


@main.command()
@click.argument("dataset", type=click.Path(exists=True, path_type=Path))
@click.option("--index", "index", default=None, help="Evaluate this built index.")
@_model_options(None)
@click.option("-k", "ks", default="1,5,10", show_default=True, help="Comma-separated K values.")
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
@click.option("--beta", default=20.0, show_default=True, help="Querybank temperature.")
@click.option("--bank-m", default=10, show_default=True, help="Querybank neighbours per item.")
@click.option("--mix", default=0.5, show_default=True, help="Hybrid rows: caption weight.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--markdown", type=click.Path(path_type=Path), default=None)
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Recall@K curves PNG.")
@click.option(
    "--save-embeddings",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the scored embeddings and caption->image map (.npz).",
)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--workers", type=int, default=None)
@click.option("--no-progress", is_flag=True)
@_read_options
@_index_dir_option
def bench(
    dataset,
    model,
    pretrained,
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
    from .bench import BenchConfig, run_bench, table, write_outputs
    from .encoder import ModelSpec
    from .querybank import BankConfig

    try:
        k_values = tuple(int(k) for k in ks.split(",") if k.strip())
    except ValueError:
        raise click.BadParameter(f"not a list of integers: {ks}", param_hint="-k") from None
    # The other options are named after their BenchConfig fields.
    config = BenchConfig(
        model=ModelSpec(model, pretrained) if model else None,
        ks=k_values,
        querybank=BankConfig(beta=beta, m=bank_m),
        progress=not no_progress,
        **options,
    )
    result = run_bench(dataset, config, save_embeddings=save_embeddings)
    click.echo(
        f"{result.counts['images']} images, {result.counts['captions']} captions; "
        f"model {result.model['model']} ({result.model['pretrained'] or 'random init'})"
    )
    click.echo(table(result))
    write_outputs(result, json_path, markdown, plot)


@main.command()
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--fp32", is_flag=True, help="Keep float32 weights (default: float16).")
def export(src, dst, fp32):
    """Write the model weights of checkpoint SRC to DST (no optimizer state; fp16)."""
    from .train import export_checkpoint

    out = export_checkpoint(src, dst, half=not fp32)
    click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@_index_dir_option
def info(name, as_json, index_dir):
    """Describe index NAME: model, counts, index types, where it lives."""
    from . import layout

    folder = layout.resolve(name, index_dir)
    manifest = {**layout.read_manifest(folder), "folder": str(folder)}
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    c, ix = manifest["counts"], manifest["indexes"]
    click.echo(f"index     {manifest['name']}  ({manifest['folder']})")
    click.echo(f"model     {manifest['model']}  pretrained: {manifest.get('pretrained') or 'none'}")
    click.echo(f"dim       {manifest['dim']}")
    click.echo(f"items     {c['items']}  ({ix['image']['factory']})")
    click.echo(f"captions  {c['captions']}  ({ix['caption']['factory']})")
    click.echo(f"skipped   {c['skipped']}  {c['skipped_by_reason'] or ''}")
    click.echo(f"created   {manifest['created']}  by retrieval {manifest['package_version']}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-n", "n", default=500, show_default=True, help="Number of images.")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=64, show_default=True, help="Image side in pixels.")
@click.option(
    "--twins", is_flag=True, help="Every other image: the previous scene with its shapes swapped."
)
def synth(out, n, seed, size, twins):
    """Write the synthetic shapes corpus (images + corpus.jsonl) to OUT."""
    from .synthetic import generate

    click.echo(f"wrote {generate(out, n=n, seed=seed, size=size, twins=twins)}")


@main.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("demo-data"),
    show_default=True,
    help="Where the synthetic corpus is generated.",
)
@click.option("-n", "n", default=400, show_default=True, help="Images in the corpus.")
@_model_options(None)
@_index_dir_option
def demo(workdir, n, model, pretrained, device, index_dir):
    """Generate the synthetic corpus, build index 'demo' and run example searches."""
    from .demo import DemoConfig, run_demo
    from .encoder import ModelSpec

    config = DemoConfig(workdir=workdir, n=n, index_dir=index_dir)
    if model:
        config = replace(config, model=ModelSpec(model, pretrained))
    result = run_demo(config)
    click.echo(f"corpus: {result.corpus}")
    click.echo(result.report.summary())
    if not result.trained:
        click.echo(
            "note: the model is an UNTRAINED tiny open_clip config (random weights), so "
            "these rankings are random; pass --pretrained to use real weights."
        )
    else:
        click.echo(f"model: {config.model.name}, trained weights {config.model.pretrained}")
    for out in result.searches:
        click.echo(f"\nquery {json.dumps(out['query'])} -> {out['target']}")
        click.echo(_table(out))


if __name__ == "__main__":  # torchrun -m retrieval.cli ...
    main()
