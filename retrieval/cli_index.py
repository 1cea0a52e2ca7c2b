"""The `retrieval` commands that change or check a built index: add, remove, compact, verify."""

from __future__ import annotations

from pathlib import Path

import click

from .cli_options import encoding_options, index_dir_option, read_options, wait_option
from .webdataset import CorpusPath


@click.group()
def commands() -> None:
    """Registered on the main group by `retrieval.cli`."""


@commands.command()
@click.argument("name")
@click.argument("corpus", type=CorpusPath(exists=True, path_type=Path))
@click.option("--upsert", is_flag=True, help="Replace items whose id is already indexed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@encoding_options
@read_options
@index_dir_option
def add(name, corpus, upsert, no_progress, index_dir, resume, wait, **options):
    """Add CORPUS's records to index NAME, encoded with the model NAME was built with."""
    from .build import BuildConfig
    from .lifecycle import add as run_add

    config = BuildConfig(progress=not no_progress, **options)
    report = run_add(corpus, name, index_dir, config, upsert=upsert, resume=resume, wait=wait)
    click.echo(report.summary())
    if sum(report.skipped.values()):
        click.echo(f"skipped records and their reasons: {report.path / 'skipped.jsonl'}")


@commands.command()
@click.argument("name")
@click.option("--id", "ids", multiple=True, help="Id of an item to remove (repeatable).")
@click.option(
    "--ids-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File with one item id per line.",
)
@wait_option
@index_dir_option
def remove(name, ids, ids_file, wait, index_dir):
    """Remove items (and their captions) from index NAME."""
    from .lifecycle import remove as run_remove

    wanted = list(ids)
    if ids_file is not None:
        lines = ids_file.read_text(encoding="utf-8").splitlines()
        wanted += [line.strip() for line in lines if line.strip()]
    if not wanted:
        raise click.UsageError("give the items to remove with --id ID or --ids-file FILE")
    report = run_remove(name, wanted, index_dir, wait=wait)
    click.echo(report.summary())


@commands.command()
@click.argument("name")
@wait_option
@index_dir_option
def compact(name, wait, index_dir):
    """Rebuild index NAME without removed items, from its stored vectors (no re-encoding)."""
    from .lifecycle import compact as run_compact

    click.echo(run_compact(name, index_dir, wait=wait).summary())


@commands.command()
@click.argument("name")
@click.option(
    "--sample",
    default=16,
    show_default=True,
    help="Items re-encoded from their files and checked against their stored vectors (0: none).",
)
@index_dir_option
def verify(name, sample, index_dir):
    """Check index NAME: checksums, counts, ids, stored vectors; exit 1 on any mismatch."""
    from .verify import verify as run_verify

    report = run_verify(name, index_dir, sample=sample)
    click.echo(report.summary())
    if not report.ok:
        raise SystemExit(1)
