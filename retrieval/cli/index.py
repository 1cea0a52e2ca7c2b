"""The `retrieval` commands that make, change, check and describe an index: build, add, remove,
compact, verify, info."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..index import integrity, layout
from ..index.config import (
    BACKENDS,
    EXPORT_FORMATS,
    TARGET_RECALL,
    VERIFY_SAMPLE,
    BuildConfig,
    ExportConfig,
)
from ..index.manifest import IndexEntry
from ..model.spec import DEFAULT_MODEL
from .options import (
    ByteSize,
    CorpusPath,
    encoding_options,
    given,
    index_dir_option,
    model_options,
    model_spec,
    read_options,
    runtime_options,
    wait_option,
)


@click.group()
def commands() -> None:
    """Registered on the main group by `retrieval.cli.group`."""


@commands.command()
@click.argument("name")
@click.argument("corpus", type=CorpusPath(exists=True, path_type=Path))
@click.option("--upsert", is_flag=True, help="Replace items whose id is already indexed.")
@model_options(None)
@encoding_options
@read_options
@index_dir_option
def add(
    name, corpus, upsert, model, pretrained, random_init, no_progress, index_dir, resume, wait,
    **options,
):  # fmt: skip
    """Add CORPUS's records to index NAME, encoded with the model NAME was built with."""
    from ..index.lifecycle import add as run_add

    config = BuildConfig(progress=not no_progress, **options)
    report = run_add(
        corpus, name, index_dir, config, upsert=upsert, resume=resume, wait=wait,
        model=model_spec(model, pretrained, random_init, index=True),
    )  # fmt: skip
    click.echo(report.summary())
    if sum(report.skipped.values()):
        click.echo(f"skipped records and their reasons: {report.path / 'skipped.jsonl'}")


@commands.command()
@click.argument("name")
@click.argument("corpus", required=False, type=CorpusPath(exists=True, path_type=Path))
@click.option("--dry-run", is_flag=True, help="List what would change, and change nothing.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@encoding_options
@read_options
@index_dir_option
def sync(name, corpus, dry_run, no_progress, index_dir, resume, wait, **options):
    """Bring index NAME in step with CORPUS [the one it was built from]: new and edited items
    encoded, items no longer listed removed, in one new version."""
    from ..corpus.readers import read_corpus
    from ..corpus.records import unique_records
    from ..index.lifecycle import add as run_add
    from ..index.store import Store
    from ..index.sync import plan

    config = BuildConfig(progress=not no_progress, **options)
    folder, manifest = integrity.open_version(name, index_dir)
    corpus = corpus or Path(manifest.corpus)
    if dry_run:
        records, _ = unique_records(read_corpus(corpus, config.read))
        with Store.open(folder / layout.STORE) as store:
            click.echo(f"index {name!r} against {corpus}:\n{plan(records, store).summary()}")
        return
    report = run_add(corpus, name, index_dir, config, resume=resume, wait=wait, sync=True)
    click.echo(report.summary())


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
    from ..index.lifecycle import remove as run_remove

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
    from ..index.lifecycle import compact as run_compact

    click.echo(run_compact(name, index_dir, wait=wait).summary())


@commands.command()
@click.argument("name")
@click.option(
    "--sample",
    default=VERIFY_SAMPLE,
    show_default=True,
    help="Items re-encoded from their files and checked against their stored vectors (0: none).",
)
@click.option(
    "--repair",
    is_flag=True,
    help="Rebuild the damaged files that can be derived (FAISS indexes, querybank normalisers) "
    "from the stored vectors, as a new version; no re-encoding.",
)
@click.option(
    "--rollback",
    is_flag=True,
    help="Point NAME back at its previous version, if that one verifies.",
)
@model_options(None)
@runtime_options
@wait_option
@index_dir_option
def verify(
    name, sample, repair, rollback, model, pretrained, random_init, device, runtime, wait, index_dir
):  # fmt: skip
    """Check index NAME: checksums, counts, ids, stored vectors; exit 1 on any mismatch."""
    from ..index import repair as ways_back
    from ..index.verify import verify as run_verify

    if repair and rollback:
        raise click.UsageError("--repair and --rollback are two different ways back: give one")
    if repair:
        click.echo(ways_back.repair(name, index_dir, wait=wait).summary())
    elif rollback:
        folder = ways_back.rollback(name, index_dir, wait=wait)
        click.echo(f"index {name!r} now points to its previous version {folder}")
    spec = model_spec(model, pretrained, random_init, index=True)
    report = run_verify(name, index_dir, sample=sample, model=spec, device=device, runtime=runtime)
    click.echo(report.summary())
    if not report.ok:
        raise SystemExit(1)


@commands.command()
@click.argument("corpus", type=CorpusPath(exists=True, path_type=Path))
@click.option("--name", required=True, help="Name of the index to create or replace.")
@model_options(DEFAULT_MODEL)
@click.option(
    "--index",
    "index",
    default=BuildConfig.index,
    show_default=True,
    help="auto (exact below 100k vectors; above, HNSW, IVF or IVF-PQ, whatever fits "
    "--max-memory) or a FAISS factory string; with --backend milvus, auto (FLAT below 50k "
    "vectors, else HNSW) or a Milvus index type (HNSW, IVF_FLAT, IVF_PQ, GPU_CAGRA, ...).",
)
@click.option(
    "--max-memory",
    type=ByteSize(),
    default=None,
    help="FAISS memory budget for both indexes (e.g. 2GB) when --index is auto [no limit].",
)
@click.option(
    "--target-recall",
    default=TARGET_RECALL,
    show_default=True,
    help="Recall@10 that approximate indexes' search effort is tuned to at build time.",
)
@click.option(
    "--bank",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Querybank corpus for qbnorm [the corpus's own captions and images].",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=BuildConfig.backend,
    show_default=True,
    help="faiss: FAISS + LMDB files in the index folder; milvus: everything in Milvus "
    "collections (other commands follow the manifest).",
)
@click.option(
    "--milvus-uri",
    default=None,
    help="With --backend milvus: a Milvus server or cluster (http://host:19530) or a "
    "milvus-lite .db file [indexes/.milvus/NAME.db]; the token comes from $MILVUS_TOKEN.",
)
@click.option(
    "--patch-tokens",
    is_flag=True,
    help="Store each image's patch tokens (fp16) for the re-ranker, so that `search --rerank` "
    "decodes no image.",
)
@encoding_options
@read_options
@index_dir_option
@click.pass_context
def build(
    ctx,
    corpus, name, model, pretrained, random_init, no_progress, index_dir, resume, wait, **options
):  # fmt: skip
    """Build index NAME from CORPUS (any format: see --format), replacing any index NAME."""
    from ..index.build import build as run_build
    from ..model.spec import ModelSpec

    _check_backend_options(ctx, options["backend"])

    # The other options are named after their BuildConfig fields.
    spec = ModelSpec(model, pretrained, random_init)
    config = BuildConfig(model=spec, progress=not no_progress, **options)
    report = run_build(corpus, name, config, index_dir=index_dir, resume=resume, wait=wait)
    if report is None:  # a torchrun rank other than 0: it encoded its share, rank 0 reports
        return
    click.echo(report.summary())
    if sum(report.skipped.values()):
        click.echo(f"skipped records and their reasons: {report.path / 'skipped.jsonl'}")


def _check_backend_options(ctx: click.Context, backend: str) -> None:
    """Options that only one backend reads, refused on the other, naming both."""
    if backend != "milvus" and given(ctx, "milvus_uri"):
        raise click.UsageError("--milvus-uri needs --backend milvus")
    if backend == "milvus":
        for option in ("max_memory", "target_recall", "bank", "patch_tokens"):
            if given(ctx, option):
                flag = "--" + option.replace("_", "-")
                raise click.UsageError(f"{flag} is for --backend faiss, not --backend milvus")


@commands.command()
@click.argument("name")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    default=ExportConfig.format,
    show_default=True,
    help="clip-retrieval: its img_emb/, text_emb/, metadata/ layout (a folder); npz or parquet: "
    "one file.",
)
@click.option(
    "--dtype", type=click.Choice(["float16", "float32"]), default=ExportConfig.dtype,
    show_default=True,
)  # fmt: skip
@index_dir_option
def embeddings(name, out, fmt, dtype, index_dir):
    """Write index NAME's embeddings, ids and metadata to OUT (not a model: see `export`)."""
    from ..index.export import export

    count = export(name, out, ExportConfig(format=fmt, dtype=dtype), index_dir)
    click.echo(f"wrote {count} items of index {name!r} to {out} ({fmt}, {dtype})")


@commands.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@index_dir_option
def info(name, as_json, index_dir):
    """Describe index NAME: model, counts, index types, where it lives."""
    folder, m = integrity.open_version(name, index_dir)
    if as_json:
        click.echo(json.dumps({**m.to_json(), "folder": str(folder)}, indent=2))
        return
    if m.milvus is not None:
        _milvus_info(m, layout.root_of(folder), folder)
        return
    c, image, caption = m.counts, m.indexes["image"], m.indexes["caption"]
    click.echo(f"index     {m.name}  ({folder})")
    click.echo(f"model     {m.model}  pretrained: {m.pretrained or 'none'}")
    click.echo(f"runtime   {m.runtime}  (search, add and verify follow it unless told)")
    click.echo(f"dim       {m.dim}")
    click.echo(f"items     {c.items}  ({image.factory}{_tuned(image)})")
    click.echo(f"captions  {c.captions}  ({caption.factory}{_tuned(caption)})")
    click.echo(f"skipped   {c.skipped}  {c.skipped_by_reason or ''}")
    from ..index.embeddings import PATCHES

    patches = (folder / layout.EMBEDDINGS / PATCHES).is_file()
    click.echo(f"patches   {'stored (search --rerank decodes no image)' if patches else 'none'}")
    if any(c.tombstones.values()):
        click.echo(
            f"removed   {c.tombstones['image']} items still in the {image.factory} index "
            "as tombstones (retrieval compact drops them)"
        )
    click.echo(f"created   {m.created}  by retrieval {m.package_version}")
    for change in m.history:
        detail = ", ".join(f"{k} {v}" for k, v in change.detail.items())
        click.echo(f"{change.op:<9} {change.at}  {detail}")


def _milvus_info(m, root: Path, folder: Path) -> None:
    from ..index.milvus.changes import status

    st = status(m, root)
    click.echo(f"index     {m.name}  ({folder})")
    click.echo(f"backend   milvus  {st.uri}  (collection {st.collection})")
    click.echo(f"model     {m.model}  pretrained: {m.pretrained or 'none'}")
    click.echo(f"runtime   {m.runtime}  (search, add and verify follow it unless told)")
    click.echo(f"dim       {m.dim}")
    click.echo(f"items     {st.items}  (Milvus {st.index_types['image']})")
    click.echo(f"captions  {st.captions}  (Milvus {st.index_types['caption']})")
    click.echo(f"skipped   {m.counts.skipped} at build, {st.skipped} by changes since")
    click.echo(f"created   {m.created}  by retrieval {m.package_version}")
    for change in st.history:
        detail = ", ".join(f"{k} {v}" for k, v in change.items() if k not in ("op", "at"))
        click.echo(f"{change['op']:<9} {change['at']}  {detail}")


def _tuned(entry: IndexEntry) -> str:
    t = entry.search
    if t is None:
        return ""
    return f", {t.knob} {t.value}: recall@10 {t.recall_at_10:.3f} on {t.queries} held-out queries"
