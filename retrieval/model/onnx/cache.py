"""The on-disk cache of exported graphs: only the first use of a model's weights pays for the
export (seconds to a minute) and the quantisation.

One folder per key under ``$RETRIEVAL_CACHE_DIR/onnx`` (default ``~/.cache/retrieval``, or
``$XDG_CACHE_HOME/retrieval``). The key hashes what the graphs depend on: the model's name, a
digest of every tensor of its state (names, shapes, dtypes, bytes), this module's format and the
torch, onnx and onnxruntime versions, so new weights or a new runtime never meet an old graph.
Each graph ``<tower>.<precision>.onnx`` has a ``.sha256`` beside it, written after it; a graph
whose bytes do not match it (cut short, altered) or that has none is exported again, never
trusted. Graphs are written through `retrieval.files.atomic_path`, so concurrent first uses
leave one whole file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

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


def graph_key(model_name: str, digest: str) -> str:
    """The cache key of a model's graphs (see the module docstring)."""
    import onnx
    import onnxruntime

    parts = {
        "format": FORMAT,
        "model": Path(model_name).name,
        "weights": digest,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


class GraphCache:
    """The graphs of one key: `get` a verified one, or make it with the function given."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, name: str, make: Callable[[Path], None]) -> Path:
        """The verified graph ``name``; made first (``make(path)`` writes it) when it is missing,
        cut short or altered."""
        path = self.folder / name
        if self._verified(path):
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            make(tmp)
            digest = sha256_file(tmp)
        with atomic_write(_digest_file(path), "w") as f:
            f.write(digest + "\n")
        return path

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
