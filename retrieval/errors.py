"""The engine's user-facing errors: each message is one sentence a person can act on.

The command line prints them as ``error: <message>`` with a non-zero exit, never a traceback.
"""

from __future__ import annotations


class RetrievalError(Exception):
    """Base of every error the engine reports to its user."""


class CorpusError(RetrievalError, ValueError):
    """The corpus as a whole cannot be read (unknown layout, missing column, bad file)."""


class EncoderError(RetrievalError, RuntimeError):
    """A model that cannot be loaded (unknown name, missing file, weights not downloadable) or
    that gives NaN/inf embeddings."""


class TrainError(RetrievalError):
    """Training cannot start or go on (no usable pairs, nothing to resume, a NaN loss)."""


class IndexBuildError(RetrievalError, ValueError):
    """An index that cannot be built as asked (bad factory string, nothing left to index)."""


class SearchError(RetrievalError, ValueError):
    """A search that cannot run (unknown index, model mismatch, unreadable query image)."""


class IndexBusyError(RetrievalError, RuntimeError):
    """Another writer (build, add, remove, compact) holds the index's lock."""


class DiskFullError(RetrievalError, OSError):
    """The disk (or a file-size limit) ran out while writing; the previous index is intact."""


class DamagedIndexError(SearchError):
    """A published index version whose files are missing, cut short or altered; the message
    names the index, the file and the way back (``verify --repair`` or ``--rollback``)."""


class PeerFailedError(RetrievalError, RuntimeError):
    """Another process of the same torchrun launch failed; the message is its own line."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its class name when it has none): what a
    one-line error quotes of a library's failure, whose messages can run to pages."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]
