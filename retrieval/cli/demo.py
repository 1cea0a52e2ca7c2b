"""The `retrieval` commands that need no data of yours: synth, demo."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click

from .options import index_dir_option, model_options, model_spec
from .search import results_table


@click.group()
def commands() -> None:
    """Registered on the main group by `retrieval.cli.group`."""


@commands.command()
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
    from ..corpus.synthetic import generate

    rels = tuple(r.strip() for r in relations.split(",") if r.strip())
    try:
        corpus = generate(out, n=n, seed=seed, size=size, twins=twins, parts=parts, relations=rels)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(f"wrote {corpus}")


@commands.command()
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
def demo(workdir, n, model, pretrained, random_init, device, index_dir):
    """Generate the synthetic corpus, build index 'demo' and run example searches."""
    from ..query.demo import DemoConfig, run_demo

    config = DemoConfig(workdir=workdir, n=n, index_dir=index_dir)
    if (spec := model_spec(model, pretrained, random_init)) is not None:
        config = replace(config, model=spec)
    result = run_demo(config)
    click.echo(f"corpus: {result.corpus}")
    click.echo(result.report.summary())
    if not result.trained:
        click.echo(
            "note: the model has random weights (--random-init), so these rankings are "
            "random; leave --random-init out for the shipped trained model."
        )
    else:
        click.echo(f"model: {config.model.name}, trained weights {config.model.pretrained}")
    for out in result.searches:
        reranked = (
            " (re-ranked: --rerank 20)" if any("itm" in r["scores"] for r in out["results"]) else ""
        )
        click.echo(f"\nquery {json.dumps(out['query'])} -> {out['target']}{reranked}")
        click.echo(results_table(out))
