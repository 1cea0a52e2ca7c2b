"""Jobs run in child processes by tests/test_faults.py, to be killed or starved of disk there.

The children fork from a forkserver that has already imported torch, open_clip and the engine,
and say when their model is loaded: a kill lands in the work itself, not in the imports.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from retrieval.corpus.readers import read_corpus
from retrieval.corpus.records import unique_records
from retrieval.errors import RetrievalError
from retrieval.index import lifecycle
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec

CONFIG = BuildConfig(progress=False, workers=0, shard_size=8, batch_size=8)


def job(op: str, corpus: Path, root: Path, name: str, fsize: int | None, out) -> None:
    """Run ``op`` ("build", "add", "sync", or "remove": ``corpus``'s ids); send "started", then
    ``("ok", seconds)`` or ``("error", message)``."""
    encoder = Encoder.load(ModelSpec("tiny-vit", random_init=True), "cpu")
    out.send("started")
    start = time.perf_counter()
    if fsize is not None:  # a file-size limit stands in for a full disk (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    try:
        if op == "build":
            build(corpus, name, CONFIG, root, encoder=encoder, resume=True)
        elif op == "sync":
            lifecycle.add(corpus, name, root, CONFIG, encoder=encoder, resume=True, sync=True)
        elif op == "remove":
            ids = [r.id for r in unique_records(read_corpus(corpus))[0]]
            lifecycle.remove(name, ids, root)
        else:
            lifecycle.add(corpus, name, root, CONFIG, encoder=encoder, resume=True)
    except RetrievalError as e:
        out.send(("error", str(e)))
        return
    except Exception as e:  # anything else is a bug the test must show
        out.send(("crash", f"{type(e).__name__}: {e}"))
        return
    out.send(("ok", time.perf_counter() - start))
