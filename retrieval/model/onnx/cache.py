"""The on-disk cache of exported graphs: only the first use of a model's weights pays for the
export (seconds to a minute) and the quantisation.

One folder per key under ``$RETRIEVAL_CACHE_DIR/onnx`` (default ``~/.cache/retrieval``, or
``$XDG_CACHE_HOME/retrieval``). The key hashes what the graphs depend on: a digest of every
tensor of the model's state (names, shapes, dtypes, bytes), its open_clip config and module
tree, the inputs' fixed sizes, the engine's traced code (`tokens`, `towers`, `export`,
`quantize`) and the versions of every package that traces, exports or quantises, so new
weights, a new config or a new runtime never meet an old graph. Folders of old keys stay
until deleted (`rm -r ~/.cache/retrieval/onnx`: the next use exports again).
Each graph ``<tower>.<precision>.onnx`` has a ``.sha256`` beside it, written after it; a graph
whose bytes do not match it (cut short, altered) or that has none is exported again, never
trusted. Graphs are written through `retrieval.files.atomic_path`, so concurrent first uses
leave one whole file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ...errors import EncoderError
from ...files import atomic_path, atomic_write, sha256_file

log = logging.getLogger(__name__)

ENV_CACHE = "RETRIEVAL_CACHE_DIR"
FORMAT = 1  # bump when `export` or `quantize` change what they write


def cache_root() -> Path:
    """Where the engine caches derived files (``$RETRIEVAL_CACHE_DIR``, else the XDG cache)."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "retrieval"


def weights_digest(model: torch.nn.Module) -> str:
    """blake2b of every tensor in ``model``'s state: its name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=20)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def graph_key(model: torch.nn.Module, name: str, shapes: dict[str, list[int]]) -> str:
    """The cache key of ``model``'s graphs (see the module docstring); ``name``: its open_clip
    name or config path; ``shapes``: the inputs' fixed sizes (pixels, context length)."""
    parts = {
        "format": FORMAT,
        "weights": weights_digest(model),
        "config": _model_config(name),
        "modules": hashlib.blake2b(repr(model).encode(), digest_size=16).hexdigest(),
        "shapes": shapes,
        "traced": _traced_code(),
        "versions": {m: _version(m) for m in _TRACED_PACKAGES},
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


# Whose code runs while a tower is traced, exported or quantised: a new version may write
# another graph from the same weights.
_TRACED_PACKAGES = (
    "torch",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "open_clip",
    "timm",
    "transformers",
)


def _version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module.replace("open_clip", "open_clip_torch"))
    except importlib.metadata.PackageNotFoundError:
        return None


def _model_config(name: str) -> dict | None:
    """open_clip's config of the registered model (pooling, activations, sizes), which its
    weights alone do not say."""
    import open_clip

    return open_clip.get_model_config(Path(name).stem if name.endswith(".json") else name)


def _traced_code() -> str:
    """A digest of this package's code that the export traces or writes with."""
    model = Path(__file__).resolve().parents[1]
    files = ("tokens.py", "towers.py", "onnx/export.py", "onnx/quantize.py")
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update((model / f).read_bytes())
    return h.hexdigest()


class GraphCache:
    """The graphs of one key: `get` a verified one, or make it with the function given.

    One process at a time looks into the folder (`locked`: an exclusive lock on its ``.lock``), so
    that concurrent first uses (torchrun's processes, a build beside a search) make each graph
    once and never read one another's half-written files.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @contextlib.contextmanager
    def locked(self) -> Iterator[GraphCache]:
        """Hold the folder for this process while it checks and makes graphs (`get`)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with (self.folder / ".lock").open("a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                yield self
        except OSError as e:
            raise EncoderError(
                f"cannot write the ONNX graph cache {self.folder} ({e.strerror or e}); set "
                f"${ENV_CACHE} to a writable folder, or use --runtime torch"
            ) from None

    def get(self, name: str, make: Callable[[Path], None]) -> Path:
        """The verified graph ``name``; made first (``make(path)`` writes it) when it is missing,
        cut short or altered. Call it inside `locked`."""
        path = self.folder / name
        if not self._verified(path):
            self._make(path, make)
        return path

    def _make(self, path: Path, make: Callable[[Path], None]) -> None:
        with atomic_path(path) as tmp:
            make(tmp)
            digest = sha256_file(tmp)
        with atomic_write(_digest_file(path), "w") as f:
            f.write(digest + "\n")

    def _verified(self, path: Path) -> bool:
        if not path.exists():
            return False
        sidecar = _digest_file(path)
        recorded = sidecar.read_text().strip() if sidecar.exists() else None
        if recorded and recorded == sha256_file(path):
            return True
        log.warning("the cached ONNX graph %s is corrupt or incomplete: making it again", path)
        return False


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
