"""Connecting to Milvus: a milvus-lite file, a standalone server or a cluster, one way.

The token comes from ``$MILVUS_TOKEN`` only (``user:password`` or an API key), so it is never
written to a manifest, a log line or an error message.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from ...errors import RetrievalError

log = logging.getLogger(__name__)

TOKEN_ENV = "MILVUS_TOKEN"
EXTRA_HINT = "the Milvus backend needs the [milvus] extra: pip install 'retrieval[milvus]'"
LITE_DIR = ".milvus"  # under the index root: the default milvus-lite files, one per index
CONNECT_TIMEOUT_S = 10.0


class MilvusError(RetrievalError, RuntimeError):
    """Milvus cannot be reached, refused the token, or failed an operation."""


def default_uri(name: str) -> str:
    """The embedded default: a milvus-lite file beside the index, relative to the index root."""
    return f"{LITE_DIR}/{name}.db"


def is_lite(uri: str) -> bool:
    return "://" not in uri and uri.endswith(".db")


def resolve_uri(uri: str, root: Path) -> str:
    """``uri`` as pymilvus takes it: a relative milvus-lite file is under the index root."""
    if is_lite(uri) and not Path(uri).is_absolute():
        path = root / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)
    return uri


class _LiteNoise(logging.Filter):
    """milvus-lite's in-process gRPC server logs a traceback each time pymilvus asks it for a
    timestamp it does not serve (pymilvus then goes on without it): drop those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Method not implemented" not in record.getMessage()


def connect(uri: str) -> Any:
    """A ``pymilvus.MilvusClient`` on ``uri``; one-line `MilvusError`s for every failure."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise MilvusError(EXTRA_HINT) from None
    if is_lite(uri):
        grpc_log = logging.getLogger("grpc._server")
        if not any(isinstance(f, _LiteNoise) for f in grpc_log.filters):
            grpc_log.addFilter(_LiteNoise())
    token = os.environ.get(TOKEN_ENV, "")
    client = None
    # milvus-lite's in-process gRPC server keeps gRPC's default ping policy (a ping at most
    # every 5 minutes), which pymilvus's 10 s keepalive breaks: the server answers GOAWAY
    # "too_many_pings" and the connection, idle between two commands, is lost.
    options = {"grpc_options": {"grpc.keepalive_time_ms": 600_000}} if is_lite(uri) else {}
    try:
        client = MilvusClient(uri=uri, token=token, timeout=CONNECT_TIMEOUT_S, **options)
        client.list_collections()  # a wrong token is refused here, not at the first write
    except Exception as e:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()  # pymilvus raises its own and grpc's errors, and ConnectionError
        hint = (
            " (milvus-lite serves one process at a time: stop the other one using it, or put "
            "the index on a Milvus server with --milvus-uri)"
            if is_lite(uri)
            else ""
        )
        raise MilvusError(f"cannot use Milvus at {uri}: {describe(e)}{hint}") from None
    return client


def describe(e: Exception) -> str:
    """pymilvus's error as one line, without the token (it never holds it, but be sure)."""
    text = getattr(e, "message", None) or str(e) or type(e).__name__
    line = " ".join(str(text).split())
    token = os.environ.get(TOKEN_ENV)
    if token:
        line = line.replace(token, "<token>")
    if "auth" in line.lower() or "credential" in line.lower():
        line += f" (check ${TOKEN_ENV})"
    return line[:300]


def guard(what: str):
    """Turn pymilvus's errors into one line naming ``what`` was being done."""

    @contextlib.contextmanager
    def run():
        try:
            yield
        except RetrievalError:
            raise
        except Exception as e:
            if not _from_milvus(e):  # a bug of ours: not the server's to answer for
                raise
            raise MilvusError(
                f"Milvus failed while {what}: {describe(e)}; nothing half-done is visible, and "
                "re-running the command finishes it"
            ) from None

    return run()


def _from_milvus(e: Exception) -> bool:
    """Whether ``e`` came from pymilvus, gRPC or the connection under them."""
    module = type(e).__module__ or ""
    return module.startswith(("pymilvus", "grpc")) or isinstance(e, (ConnectionError, TimeoutError))
