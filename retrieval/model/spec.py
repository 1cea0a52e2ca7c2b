"""Which model: a `ModelSpec` names an open_clip architecture and its weights, without loading.

Light on purpose (no torch): the command line, the manifest and configs name models through it;
`retrieval.model.encoder` is what loads one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import sha256_file

CONFIG_DIR = Path(__file__).parent / "configs"  # open_clip model configs shipped here
DEFAULT_MODEL = "tiny-vit"  # shipped config; offline, fast on a CPU, random until trained
# tiny-vit trained by `retrieval train` on the synthetic shapes corpus (benchmarks/README.md).
SHIPPED_MODEL = Path(__file__).parent / "weights" / "tiny-vit-shapes.pt"


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load: an open_clip name or config-JSON path, and optional weights."""

    name: str = DEFAULT_MODEL
    pretrained: str | None = None  # open_clip tag, or a local checkpoint file

    @property
    def checkpoint(self) -> Path | None:
        """The local checkpoint file, when ``pretrained`` names one."""
        if self.pretrained and Path(self.pretrained).expanduser().is_file():
            return Path(self.pretrained).expanduser().resolve()
        return None

    @property
    def is_tag(self) -> bool:
        """``pretrained`` names open_clip weights ("openai", "laion2b_s34b_b79k"), not a file."""
        p = self.pretrained
        return bool(p) and self.checkpoint is None and "/" not in p and Path(p).suffix == ""

    def identity(self) -> ModelIdentity:
        """What a manifest records so that a later search can check it uses the same model."""
        ckpt = self.checkpoint
        pretrained = str(ckpt) if ckpt else self.pretrained
        return ModelIdentity(self.name, pretrained, sha256_file(ckpt) if ckpt else None)


@dataclass(frozen=True)
class ModelIdentity:
    """A model as recorded on disk: its name, its weights, and the checkpoint file's sha256."""

    model: str
    pretrained: str | None
    checkpoint_sha256: str | None

    def to_json(self) -> dict[str, str | None]:
        return asdict(self)


def default_model() -> ModelSpec:
    """The shipped trained tiny model, or an untrained one if the file is missing."""
    if SHIPPED_MODEL.is_file():
        return ModelSpec(DEFAULT_MODEL, str(SHIPPED_MODEL))
    return ModelSpec(DEFAULT_MODEL)
