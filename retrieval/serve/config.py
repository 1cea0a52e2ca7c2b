"""The limits of one server: `ServeConfig`, the one source of `retrieval serve`'s defaults.

FastAPI-free, so the command line reads its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..corpus.images import DEFAULT_MAX_PIXELS
from ..query.cache import DEFAULT_CACHE_SIZE

DEFAULT_HOST = "127.0.0.1"  # this machine only, unless told otherwise
DEFAULT_PORT = 8000
# Dynamic batching (`retrieval.serve.batching`): at most this many searches answered together,
# and the longest a batch waits for requests still being read once it has its first.
DEFAULT_MAX_BATCH = 64
DEFAULT_BATCH_WAIT_MS = 5.0


@dataclass(frozen=True)
class ServeConfig:
    """Limits of one server."""

    max_upload_bytes: int = 10 * 1024 * 1024  # whole request body, image included
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_k: int = 1000
    max_thumb: int = 1024
    # Responses give each image's path relative to the corpus folder (none outside it), not
    # the server's filesystem, unless the operator asks for it (`serve --show-paths`).
    show_paths: bool = False
    max_batch: int = DEFAULT_MAX_BATCH  # 1: one search at a time
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    cache_size: int = DEFAULT_CACHE_SIZE  # query embeddings kept (0: none)
