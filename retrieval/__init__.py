"""Cross-modal retrieval: fine-tune CLIP-style dual encoders, index with FAISS + LMDB, search.

The Python API mirrors the command line::

    from retrieval import BuildConfig, ModelSpec, Query, Searcher, build

    build("photos/", "holiday", BuildConfig(model=ModelSpec("tiny-vit")))
    with Searcher.open("holiday") as s:
        s.search(Query(text="a dog on a beach"), k=5)

Subpackages are layers, each importing only those below it (docs/ARCHITECTURE.md):
``scoring`` < ``corpus`` < ``model`` < ``index``, ``train`` < ``query`` < ``eval`` <
``serve`` < ``cli``; ``errors`` and ``files`` sit under all of them.
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
    "BuildConfig": "index.config",
    "BuildReport": "index.build",
    "build": "index.build",
    "Encoder": "model.encoder",
    "ModelSpec": "model.spec",
    "Query": "query.search",
    "QueryTerm": "query.search",
    "Request": "query.search",
    "Searcher": "query.search",
    "ReadOptions": "corpus.records",
    "Record": "corpus.records",
    "read_corpus": "corpus.readers",
    "TrainConfig": "train.config",
    "RetrievalError": "errors",
}

__all__ = [*sorted(_LAZY), "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
