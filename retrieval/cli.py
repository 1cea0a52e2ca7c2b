"""The `retrieval` command: parse, call one library function, print."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import click

from . import cli_index, cli_train
from .cli_options import (
    ByteSize,
    ErrorGroup,
    encoding_options,
    index_dir_option,
    model_options,
    model_spec,
    read_options,
)
from .query import STRATEGIES
from .webdataset import CorpusPath


@click.group(cls=ErrorGroup)
@click.version_option(package_name="retrieval")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Search images by text and text by image: train, build, search, measure."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("corpus", type=CorpusPath(exists=True, path_type=Path))
@click.option("--name", required=True, help="Name of the index to create or replace.")
@model_options("tiny-vit")
@click.option(
    "--index",
    "index",
    default="auto",
    show_default=True,
    help="auto (exact below 100k vectors; above, HNSW, IVF or IVF-PQ, whatever fits "
    "--max-memory) or a FAISS factory string.",
)
@click.option(
    "--max-memory",
    type=ByteSize(),
    default=None,
    help="FAISS memory budget for both indexes (e.g. 2GB) when --index is auto [no limit].",
)
@click.option(
    "--target-recall",
    default=0.95,
    show_default=True,
    help="Recall@10 that approximate indexes' search effort is tuned to at build time.",
)
@click.option(
    "--bank",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Querybank corpus for qbnorm [the corpus's own captions and images].",
)
@encoding_options
@read_options
@index_dir_option
def build(corpus, name, model, pretrained, no_progress, index_dir, resume, wait, **options):
    """Build index NAME from CORPUS (any format: see --format), replacing any index NAME."""
    from .build import BuildConfig
    from .build import build as run_build
    from .encoder import ModelSpec

    # The other options are named after their BuildConfig fields.
    config = BuildConfig(model=ModelSpec(model, pretrained), progress=not no_progress, **options)
    report = run_build(corpus, name, config, index_dir=index_dir, resume=resume, wait=wait)
    if report is None:  # a torchrun rank other than 0: it encoded its share, rank 0 reports
        return
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
    help="Also write a contact sheet (.png, .jpg, .webp): thumbnails, rank, score, caption.",
)
@model_options(None)
@index_dir_option
def search(name, text, image, image_weight, terms, as_json, grid, model, pretrained, **options):
    """Search index NAME by --text, --image, or both (and more --term)."""
    from .search import Query
    from .search import search as run_search

    terms = tuple(_parse_term(t) for t in terms)
    query = Query(text=text, image=image, image_weight=image_weight, terms=terms)
    if not query.all_terms():
        raise click.UsageError("give --text, --image or both")
    if grid is not None:
        from .grid import sheet_format

        sheet_format(grid)  # a bad file name fails before the search, not after it
    spec = model_spec(model, pretrained, index=True)
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
    "--max-upload-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Largest request body accepted.",
)
@model_options(None)
@index_dir_option
def serve(name, host, port, max_upload_mb, model, pretrained, device, index_dir):
    """Serve index NAME over HTTP: a search page at / and a JSON API (docs at /docs)."""
    from .serve import ServeConfig
    from .serve import serve as run_server

    config = ServeConfig(max_upload_bytes=int(max_upload_mb * 2**20))
    spec = model_spec(model, pretrained, index=True)
    run_server(name, index_dir, host=host, port=port, device=device, config=config, model=spec)


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
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@index_dir_option
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
    click.echo(f"items     {c['items']}  ({ix['image']['factory']}{_tuned(ix['image'])})")
    click.echo(f"captions  {c['captions']}  ({ix['caption']['factory']}{_tuned(ix['caption'])})")
    click.echo(f"skipped   {c['skipped']}  {c['skipped_by_reason'] or ''}")
    tombstones = c.get("tombstones", {})
    if any(tombstones.values()):
        click.echo(
            f"removed   {tombstones['image']} items still in the {ix['image']['factory']} index "
            "as tombstones (retrieval compact drops them)"
        )
    click.echo(f"created   {manifest['created']}  by retrieval {manifest['package_version']}")
    for change in manifest.get("history", []):
        detail = ", ".join(f"{k} {v}" for k, v in change.items() if k not in ("op", "at"))
        click.echo(f"{change['op']:<9} {change['at']}  {detail}")


def _tuned(index: dict) -> str:
    search = index.get("search")
    if not search:
        return ""
    return (
        f", {search['knob']} {search['value']}: recall@10 {search['recall@10']:.3f} on "
        f"{search['queries']} held-out queries"
    )


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-n", "n", default=500, show_default=True, help="Number of images.")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", default=64, show_default=True, help="Image side in pixels.")
@click.option(
    "--twins", is_flag=True, help="Every other image: the previous scene with its shapes swapped."
)
@click.option("--parts", is_flag=True, help="Add one caption per shape saying where it is.")
@click.option(
    "--relations",
    default="left of,right of,above,below",
    show_default=True,
    help="Comma-separated relations to draw scenes from.",
)
def synth(out, n, seed, size, twins, parts, relations):
    """Write the synthetic shapes corpus (images + corpus.jsonl) to OUT."""
    from .synthetic import generate

    rels = tuple(r.strip() for r in relations.split(",") if r.strip())
    try:
        corpus = generate(out, n=n, seed=seed, size=size, twins=twins, parts=parts, relations=rels)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {corpus}")


@main.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("demo-data"),
    show_default=True,
    help="Where the synthetic corpus is generated.",
)
@click.option("-n", "n", default=400, show_default=True, help="Images in the corpus.")
@model_options(None)
@index_dir_option
def demo(workdir, n, model, pretrained, device, index_dir):
    """Generate the synthetic corpus, build index 'demo' and run example searches."""
    from .demo import DemoConfig, run_demo

    config = DemoConfig(workdir=workdir, n=n, index_dir=index_dir)
    if (spec := model_spec(model, pretrained)) is not None:
        config = replace(config, model=spec)
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


for _group in (cli_train.commands, cli_index.commands):
    for _command in _group.commands.values():
        main.add_command(_command)

if __name__ == "__main__":  # torchrun -m retrieval.cli ...
    main()
