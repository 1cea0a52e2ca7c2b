"""The `retrieval` commands that query a built index: search, serve."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..query.ranking import (
    DEFAULT_DEDUP,
    DEFAULT_IMAGE_WEIGHT,
    DEFAULT_K,
    DEFAULT_MIX,
    DEFAULT_OVERFETCH,
    DEFAULT_STRATEGY,
    MAX_RERANK,
    STRATEGIES,
)
from ..serve.config import DEFAULT_HOST, DEFAULT_PORT, ServeConfig
from .options import given, index_dir_option, model_options, model_spec, runtime_options


@click.group()
def commands() -> None:
    """Registered on the main group by `retrieval.cli.group`."""


@commands.command()
@click.argument("name")
@click.option("--text", default=None, help="Text query.")
@click.option("--image", type=click.Path(path_type=Path), default=None, help="Image query file.")
@click.option(
    "--vector",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="An embedding computed elsewhere, in the index's model's space: a .npy of one vector "
    "or a JSON list of numbers.",
)
@click.option(
    "--image-weight",
    default=DEFAULT_IMAGE_WEIGHT,
    show_default=True,
    help="With both --text and --image: the image's weight (the text gets 1 - it).",
)
@click.option(
    "--term",
    "terms",
    multiple=True,
    metavar="KIND:WEIGHT:VALUE",
    help="Extra term, e.g. text:-0.5:blurry, image:0.3:ref.jpg or vector:0.5:v.npy (repeatable).",
)
@click.option("-k", "k", default=DEFAULT_K, show_default=True, help="Number of results.")
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
@click.option(
    "--overfetch", default=DEFAULT_OVERFETCH, show_default=True, help="Candidates per signal: x k."
)
@click.option(
    "--mix",
    default=DEFAULT_MIX,
    show_default=True,
    help="hybrid: weight of the other modality's signal.",
)
@click.option(
    "--dedup",
    type=click.FloatRange(0, 1, min_open=True),
    is_flag=False,
    flag_value=DEFAULT_DEDUP,
    default=None,
    help=f"Fold results whose images are this close (cosine) to a better one's into it "
    f"[off; alone: {DEFAULT_DEDUP}].",
)
@click.option(
    "--rerank",
    type=click.IntRange(1, MAX_RERANK),
    default=None,
    metavar="N",
    help="Re-order the top N with the cross-attention re-ranker (a text searching images, an "
    "image searching captions); its score shows as 'itm'.",
)
@click.option(
    "--reranker",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint holding the re-ranker (`train --itm`) [the index model's own].",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--grid",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write a contact sheet (.png, .jpg, .webp): thumbnails, rank, score, caption.",
)
@model_options(None)
@runtime_options
@index_dir_option
def search(
    name, text, image, vector, image_weight, terms, as_json, grid, model, pretrained, random_init,
    **options,
):  # fmt: skip
    """Search index NAME by --text, --image, or both, or by --vector (and more --term)."""
    from ..query.search import Query
    from ..query.search import search as run_search

    terms = tuple(_parse_term(t) for t in terms)
    if vector is not None and (text is not None or image is not None):
        raise click.UsageError("--vector stands alone: compose it with --term vector:W:FILE")
    embedding = read_vector(vector) if vector is not None else None
    query = Query(text=text, image=image, image_weight=image_weight, terms=terms, vector=embedding)
    if not query.all_terms():
        raise click.UsageError("give --text, --image or both, or --vector")
    _refuse_meaningless(click.get_current_context(), query, options["strategy"])
    if grid is not None:
        from ..serve.sheets import sheet_format

        sheet_format(grid)  # a bad file name or folder fails before the search, not after it
        if not grid.parent.is_dir():
            raise click.UsageError(f"--grid {grid}: the folder {grid.parent} does not exist")
    spec = model_spec(model, pretrained, random_init, index=True)
    # The other options are named after Searcher.search's keywords (and index_dir, device).
    out = run_search(name, query, model=spec, **options)
    click.echo(json.dumps(out, ensure_ascii=False, indent=2) if as_json else results_table(out))
    if grid is not None:
        from ..serve.sheets import contact_sheet

        click.echo(f"contact sheet: {contact_sheet(out['results'], grid)}", err=as_json)


def _refuse_meaningless(ctx: click.Context, query, strategy: str | None) -> None:
    """A usage error for an option that the others make meaningless, naming both."""
    if given(ctx, "image_weight") and not (query.text and query.image):
        raise click.UsageError("--image-weight weighs --image against --text: give both")
    hybrid = ("hybrid", "hybrid-rrf")
    if given(ctx, "mix") and strategy not in hybrid:
        raise click.UsageError(
            f"--mix weighs the other modality in --strategy {' or '.join(hybrid)}; with "
            f"--strategy {strategy or DEFAULT_STRATEGY} it does nothing"
        )
    one_term = len(query.all_terms()) == 1  # arith on one term is plain cosine
    if (
        given(ctx, "overfetch")
        and (strategy or DEFAULT_STRATEGY) in ("cosine", "arith")
        and one_term
    ):
        raise click.UsageError(
            "--overfetch sets the candidates each signal fetches for fusion; --strategy "
            "cosine with one query term fuses nothing (the index's own top k are the answer)"
        )


@commands.command()
@click.argument("name")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Interface to bind.")
@click.option("--port", default=DEFAULT_PORT, show_default=True)
@click.option(
    "--max-upload-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=ServeConfig.max_upload_bytes / 2**20,
    show_default=True,
    help="Largest request body accepted.",
)
@click.option(
    "--show-paths",
    is_flag=True,
    help="Show each image's full path on this machine [paths relative to the corpus folder].",
)
@click.option(
    "--reranker",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Checkpoint holding the re-ranker (`train --itm`) for requests with rerank [the index "
    "model's own].",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=ServeConfig.max_batch,
    show_default=True,
    help="Most searches answered together (one forward pass, one batched search); 1: one at a "
    "time.",
)
@click.option(
    "--batch-wait-ms",
    type=click.FloatRange(min=0),
    default=ServeConfig.batch_wait_ms,
    show_default=True,
    help="Longest a batch waits for requests still being read (a lone request never waits).",
)
@click.option(
    "--cache-size",
    type=click.IntRange(min=0),
    default=ServeConfig.cache_size,
    show_default=True,
    help="Query embeddings kept (texts, and images by content); 0: none.",
)
@model_options(None)
@runtime_options
@index_dir_option
def serve(
    name, host, port, max_upload_mb, show_paths, reranker, max_batch, batch_wait_ms, cache_size,
    model, pretrained, random_init, device, runtime, index_dir,
):  # fmt: skip
    """Serve index NAME over HTTP: a search page at / and a JSON API (docs at /docs)."""
    from ..serve.app import serve as run_server

    config = ServeConfig(
        max_upload_bytes=int(max_upload_mb * 2**20), show_paths=show_paths, max_batch=max_batch,
        batch_wait_ms=batch_wait_ms, cache_size=cache_size,
    )  # fmt: skip
    spec = model_spec(model, pretrained, random_init, index=True)
    run_server(
        name, index_dir, host=host, port=port, device=device, config=config, model=spec,
        reranker=reranker, runtime=runtime,
    )  # fmt: skip


def _parse_term(text: str):
    from ..query.search import QueryTerm

    kind, _, rest = text.partition(":")
    weight, _, value = rest.partition(":")
    try:
        w = float(weight)
    except ValueError:
        w = None
    if kind not in ("text", "image", "vector") or w is None or not value:
        raise click.BadParameter(
            f"{text!r}: use text:WEIGHT:words, image:WEIGHT:path or vector:WEIGHT:file",
            param_hint="--term",
        )
    if kind == "vector":
        return QueryTerm(vector=read_vector(Path(value)), weight=w)
    return QueryTerm(text=value, weight=w) if kind == "text" else QueryTerm(image=value, weight=w)


def read_vector(path: Path):
    """The numbers in ``path`` (.npy of one vector, or a JSON list) as a 1-d array."""
    import numpy as np

    try:
        if path.suffix.lower() == ".npy":
            numbers = np.load(path, allow_pickle=False)
        else:
            numbers = np.asarray(json.loads(path.read_text(encoding="utf-8")), dtype=np.float64)
    except (OSError, ValueError, TypeError) as e:
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise click.BadParameter(f"{path}: not a vector ({why})", param_hint="--vector") from None
    if numbers.ndim == 2 and numbers.shape[0] == 1:
        numbers = numbers[0]
    if numbers.ndim != 1 or not np.issubdtype(numbers.dtype, np.number):
        raise click.BadParameter(
            f"{path}: one vector of numbers, not an array of shape {numbers.shape}",
            param_hint="--vector",
        )
    return numbers


def results_table(out: dict) -> str:
    """One line per result: line breaks and tabs in ids and captions are shown escaped."""
    lines = [f"{'rank':>4}  {'score':>7}  {'id':<24}  caption"]
    for r in out["results"]:
        caption = r["caption"]["text"] if "caption" in r else (r["captions"] or [""])[0]
        item, caption = _one_line(r["id"]), _one_line(caption)
        if r.get("duplicates"):
            caption = f"(+{len(r['duplicates'])} near-copies) {caption}"
        lines.append(f"{r['rank']:>4}  {r['score']:>7.4f}  {item:<24}  {caption[:70]}")
    if not out["results"]:
        lines.append("(no results)")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
