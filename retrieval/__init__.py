"""Cross-modal retrieval: fine-tune CLIP-style dual encoders, index with FAISS + LMDB, search.

The Python API mirrors the command line::

    from retrieval import BuildConfig, ModelSpec, Query, Searcher
    from retrieval.build import build

    build("photos/", "holiday", BuildConfig(model=ModelSpec("tiny-vit")))
    with Searcher.open("holiday") as s:
        s.search(Query(text="a dog on a beach"), k=5)
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retrieval")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

# Imported on first use: `import retrieval` (and `retrieval --help`) must not pay for torch.
_LAZY = {
    "BuildConfig": "build",
    "BuildReport": "build",
    "Encoder": "encoder",
    "ModelSpec": "encoder",
    "Query": "search",
    "Searcher": "search",
    "ReadOptions": "data",
    "Record": "data",
    "read_corpus": "data",
    "RetrievalError": "errors",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
