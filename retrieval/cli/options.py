"""Options shared by the `retrieval` commands: model, index folder, corpus reading, sizes."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

import click

from ..corpus.readers import FORMATS
from ..corpus.records import ReadOptions
from ..corpus.webdataset import is_pattern
from ..index.config import BuildConfig
from ..index.layout import DEFAULT_INDEX_DIR, ENV_INDEX_DIR
from ..model.runtime import DEFAULT_RUNTIME, ENGINES, ONNX_EXTRA, PRECISIONS, RuntimeChoice
from ..model.spec import DEFAULT_MODEL, ModelSpec

_MODEL_HELP = (
    "open_clip model name (e.g. ViT-B-32), a shipped config (tiny-vit, small-vit) or a path to "
    "an open_clip model-config JSON."
)
_OWN_MODEL_HELP = f" Default: the index's own model ({DEFAULT_MODEL} where no index is involved)."
_PRETRAINED_HELP = "open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a local checkpoint file."
_ALONE_HELP = (
    " Alone: weights for the default model or, with an index, for its own model (its checkpoint"
    " at a new path)."
)


def index_dir_option(f):
    return click.option(
        "--index-dir",
        type=click.Path(path_type=Path),
        envvar=ENV_INDEX_DIR,
        default=DEFAULT_INDEX_DIR,
        show_default=True,
        help=f"Folder holding the indexes (env: {ENV_INDEX_DIR}).",
    )(f)


def model_options(default_model: str | None):
    def wrap(f):
        f = click.option(
            "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ..."
        )(f)
        alone = "" if default_model else _ALONE_HELP  # where --model may be left out
        f = click.option(
            "--random-init",
            is_flag=True,
            help="Random weights, for tests (a tower model such as effnet-minilm keeps its "
            "pretrained towers: only its projections start random).",
        )(f)
        f = click.option("--pretrained", default=None, help=_PRETRAINED_HELP + alone)(f)
        model_help = _MODEL_HELP + (
            f" Default: {default_model}." if default_model else _OWN_MODEL_HELP
        )
        return click.option("--model", default=default_model, help=model_help)(f)

    return wrap


def model_spec(
    model: str | None, pretrained: str | None, random_init: bool, index: bool = False
) -> ModelSpec | None:
    """``--model`` / ``--pretrained`` / ``--random-init`` as a ModelSpec; None when none is given.

    ``--pretrained`` alone: weights for the default model or, with ``index``, for the index's
    own model (its checkpoint at a new path).
    """
    if model is None and pretrained is None and not random_init:
        return None
    return ModelSpec(model or ("" if index else DEFAULT_MODEL), pretrained, random_init)


def read_options(f):
    """Corpus-reading options, handed to the command as one ``read`` (a ReadOptions)."""

    @functools.wraps(f)
    def wrapper(*args, **kw):
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
            "--image-col",
            default=ReadOptions.image_col,
            show_default=True,
            help="CSV image column.",
        ),
        click.option(
            "--caption-col",
            default=ReadOptions.caption_col,
            show_default=True,
            help="CSV caption column.",
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


def runtime_options(f):
    """``--runtime`` / ``--precision``, handed to the command as one ``runtime`` (a
    RuntimeChoice: what is left out follows the index, or the default)."""

    @functools.wraps(f)
    def wrapper(*args, **kw):
        return f(*args, runtime=RuntimeChoice(kw.pop("engine"), kw.pop("precision")), **kw)

    wrapper = click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default=None,
        help="int8: ONNX Runtime's dynamic quantisation of the weight matrix products (implies "
        "--runtime onnx; costs recall, see the README) [the index's, else "
        f"{DEFAULT_RUNTIME.precision}].",
    )(wrapper)
    return click.option(
        "--runtime",
        "engine",
        type=click.Choice(ENGINES),
        default=None,
        help=f"What runs the model on the CPU: torch, or onnx (ONNX Runtime, the '{ONNX_EXTRA}' "
        f"extra; exported once per weights, cached) [the index's, else {DEFAULT_RUNTIME.engine}; "
        "CUDA: torch].",
    )(wrapper)


def encoding_options(f):
    """How records are decoded, encoded and spooled (build and add); named as in BuildConfig."""
    opts = [
        click.option("--batch-size", default=BuildConfig.batch_size, show_default=True),
        click.option(
            "--workers", type=int, default=None, help="Image-decoding processes [cores-1]."
        ),
        click.option(
            "--max-pixels",
            default=BuildConfig.max_pixels,
            show_default=True,
            help="Refuse images with more pixels (decompression bombs).",
        ),
        click.option(
            "--shard-size",
            default=BuildConfig.shard_size,
            show_default=True,
            help="Records per spooled shard: what an interrupted run can lose at most.",
        ),
        click.option(
            "--resume",
            is_flag=True,
            help="Re-use what an interrupted run of the same command spooled.",
        ),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return runtime_options(wait_option(f))


def wait_option(f):
    return click.option(
        "--wait",
        type=float,
        default=0.0,
        show_default=True,
        help="Seconds to wait while another command changes the same index [fail at once].",
    )(f)


class ByteSize(click.ParamType):
    """``2GB``, ``512MiB``, ``1.5G``, ``300000``: a number of bytes (K/M/G/T powers of 1024)."""

    name = "size"
    _UNITS: ClassVar[dict[str, int]] = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("b").removesuffix("i")
        number, unit = text.rstrip("kmgt"), text[len(text.rstrip("kmgt")) :]
        try:
            return int(float(number) * self._UNITS[unit])
        except (ValueError, KeyError):
            self.fail(f"{value!r} is not a size (e.g. 2GB, 512MiB, 300000)", param, ctx)


class CorpusPath(click.Path):
    """`click.Path` that also accepts a shard pattern such as ``shards/{00000..00009}.tar``."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str) and is_pattern(value):
            return Path(value).expanduser()
        return super().convert(value, param, ctx)


def given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` (its parameter name) was set by the user, not left default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source not in (
        click.core.ParameterSource.DEFAULT,
        click.core.ParameterSource.DEFAULT_MAP,
    )
