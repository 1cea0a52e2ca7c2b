"""Fault injection: builds and adds killed with SIGKILL at random moments, and a full disk.

Each kill happens in a child process at a seeded random moment of its run; then the published
index must verify, and a resumed (build) or retried (add) run must end with every accepted
record exactly once, and, for a build, with the vectors of an uninterrupted one.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fault_worker import CONFIG, job

from retrieval.corpus import synthetic
from retrieval.corpus.readers import read_corpus
from retrieval.corpus.records import unique_records
from retrieval.index import layout, lifecycle
from retrieval.index.build import build
from retrieval.index.manifest import CAPTION_INDEX, IMAGE_INDEX
from retrieval.index.store import Store
from retrieval.index.vector_index import VectorIndex
from retrieval.index.verify import verify
from retrieval.query.search import Query, Searcher

KILLS = 20
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ctx():
    context = mp.get_context("forkserver")
    # The engine's modules, imported once in the server; "fault_worker" itself is not on the
    # server's path when it starts, and a failed preload is silent.
    context.set_forkserver_preload(["retrieval.index.lifecycle", "retrieval.index.verify"])
    return context


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return synthetic.generate(root / "a", n=40, seed=4), synthetic.generate(
        root / "b", n=40, seed=5
    )


def _run(ctx, op, corpus, root, name, fsize=None, kill_after=None):
    """Run a job in a child; kill it after ``kill_after`` seconds. Its message, or None."""
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=job, args=(op, corpus, root, name, fsize, send))
    child.start()
    assert recv.poll(120) and recv.recv() == "started"
    child.join(kill_after if kill_after is not None else 120)
    if child.is_alive():
        child.kill()  # SIGKILL: no cleanup, no finally blocks, no atexit
        child.join()
    return recv.recv() if recv.poll() else None


def _state(root, name="x") -> tuple[list[str], dict[str, np.ndarray]]:
    """Item ids (sorted) and FAISS vectors by id of the published index."""
    folder = layout.resolve(name, root)
    with Store.open(folder / layout.STORE) as store:
        ids = sorted(it["id"] for it in store.iter_items())
    vectors = {}
    for kind, file in (("image", IMAGE_INDEX), ("caption", CAPTION_INDEX)):
        index = VectorIndex.load(folder / file, "Flat")
        vectors[kind] = index.vectors(np.sort(index.ids()))
    return ids, vectors


def _ids(corpus) -> list[str]:
    return sorted(r.id for r in unique_records(read_corpus(corpus))[0])


def _moments(ctx, op, corpus, root, name) -> np.ndarray:
    """Seeded kill moments spread over a whole uninterrupted run (measured here, now)."""
    message = _run(ctx, op, corpus, root, name)
    assert message is not None and message[0] == "ok", message
    return np.random.default_rng(0).uniform(0.0, message[1] * 1.1, KILLS)


def test_builds_killed_at_random_moments_resume_to_the_uninterrupted_index(
    tmp_path, ctx, corpora, encoder
):
    a, _ = corpora
    moments = _moments(ctx, "build", a, tmp_path / "ref", "x")
    want_ids, want_vectors = _state(tmp_path / "ref")
    assert want_ids == _ids(a)
    outcomes = set()
    for n, moment in enumerate(moments):
        root = tmp_path / f"run{n}"
        _run(ctx, "build", a, root, "x", kill_after=moment)
        outcomes.add(_outcome(root))
        if layout.list_indexes(root):  # killed after publishing: the index must be whole
            assert verify("x", root, sample=0).ok, f"kill at {moment:.2f}s"
        build(a, "x", CONFIG, root, encoder=encoder, resume=True)
        report = verify("x", root, sample=2, encoder=encoder)
        assert report.ok, f"kill at {moment:.2f}s:\n{report.summary()}"
        ids, vectors = _state(root)
        assert ids == want_ids, f"kill at {moment:.2f}s"
        for kind in vectors:
            np.testing.assert_allclose(vectors[kind], want_vectors[kind], atol=1e-6)
        shutil.rmtree(root)
    assert len(outcomes) >= 3, outcomes  # the kills hit several phases of the build


def _outcome(root: Path) -> str:
    """Where a kill struck: the number of shards spooled, or "published"."""
    return "published" if (root / "x").exists() else _shards(root)


def _shards(root: Path) -> str:
    return f"{len(list(layout.spool_dir(root, 'x').glob('shard-*.npz')))} shards"


def test_adds_killed_at_random_moments_lose_and_duplicate_nothing(tmp_path, ctx, corpora, encoder):
    a, b = corpora
    base = tmp_path / "base"
    build(a, "x", CONFIG, base, encoder=encoder)
    before, after = _ids(a), sorted(_ids(a) + _ids(b))
    shutil.copytree(base, tmp_path / "timing", symlinks=True)
    moments = _moments(ctx, "add", b, tmp_path / "timing", "x")
    outcomes = set()
    for n, moment in enumerate(moments):
        root = tmp_path / f"run{n}"
        shutil.copytree(base, root, symlinks=True)
        _run(ctx, "add", b, root, "x", kill_after=moment)
        assert verify("x", root, sample=0).ok, f"kill at {moment:.2f}s"
        ids = _state(root)[0]
        assert ids in (before, after), f"kill at {moment:.2f}s"
        outcomes.add("added" if ids == after else _shards(root))
        report = lifecycle.add(b, "x", root, CONFIG, encoder=encoder, resume=True)
        assert verify("x", root, sample=2, encoder=encoder).ok
        assert _state(root)[0] == after, f"kill at {moment:.2f}s"
        assert report.added + sum(report.skipped.values()) == len(_ids(b))
        shutil.rmtree(root)
    assert len(outcomes) >= 3, outcomes


def test_removes_killed_at_random_moments_leave_one_version_or_the_other(
    tmp_path, ctx, corpora, encoder
):
    a, b = corpora
    base = tmp_path / "base"
    build(a, "x", CONFIG, base, encoder=encoder)
    lifecycle.add(b, "x", base, CONFIG, encoder=encoder)
    _kill_then_rerun(
        ctx, "remove", b, base, (sorted(_ids(a) + _ids(b)), _ids(a)),
        lambda root: lifecycle.remove("x", _ids(b), root),
    )  # fmt: skip


def test_syncs_killed_at_random_moments_leave_one_version_or_the_other(
    tmp_path, ctx, corpora, encoder
):
    # The corpus moves from a to b: every item of a goes, every item of b comes, in one version.
    a, b = corpora
    base = tmp_path / "base"
    build(a, "x", CONFIG, base, encoder=encoder)
    _kill_then_rerun(
        ctx, "sync", b, base, (_ids(a), _ids(b)),
        lambda root: lifecycle.add(b, "x", root, CONFIG, encoder=encoder, resume=True, sync=True),
    )  # fmt: skip


def _kill_then_rerun(ctx, op, corpus, base: Path, states, rerun) -> None:
    """Kill ``op`` at KILLS / 2 random moments over its run on copies of ``base``: each leaves
    the ``(before, after)`` ids, verified, and ``rerun(root)`` then ends at ``after``."""
    before, after = states
    shutil.copytree(base, base.parent / "timing", symlinks=True)
    moments = _moments(ctx, op, corpus, base.parent / "timing", "x")[: KILLS // 2]
    for n, moment in enumerate(moments):
        root = base.parent / f"run{n}"
        shutil.copytree(base, root, symlinks=True)
        _run(ctx, op, corpus, root, "x", kill_after=moment)
        assert verify("x", root, sample=0).ok, f"kill at {moment:.2f}s"
        assert _state(root)[0] in (before, after), f"kill at {moment:.2f}s"
        rerun(root)
        assert verify("x", root, sample=0).ok and _state(root)[0] == after
        shutil.rmtree(root)


def _largest_file(root: Path) -> int:
    return max(p.stat().st_size for p in layout.resolve("x", root).rglob("*") if p.is_file())


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.9])
def test_a_full_disk_fails_clearly_and_leaves_the_previous_index_searchable(
    tmp_path, ctx, corpora, encoder, fraction
):
    a, b = corpora
    build(a, "x", CONFIG, tmp_path, encoder=encoder)
    limit = int(_largest_file(tmp_path) * fraction)
    published = layout.resolve("x", tmp_path)
    for op, corpus in (("add", b), ("build", a)):
        message = _run(ctx, op, corpus, tmp_path, "x", fsize=limit)
        assert message is not None and message[0] == "error", message
        assert message[1].startswith("out of disk space"), message[1]
        assert "the previous index is intact" in message[1]
        assert layout.resolve("x", tmp_path) == published
        assert verify("x", tmp_path, sample=2, encoder=encoder).ok
        versions = list((tmp_path / ".versions" / "x").iterdir())
        assert versions == [published]  # the half-written version was removed
        with Searcher.open("x", tmp_path, encoder=encoder) as s:
            assert len(s.search(Query(text="a red circle"), k=100)["results"]) == 40
    # With space again, the interrupted add goes through.
    report = lifecycle.add(b, "x", tmp_path, CONFIG, encoder=encoder, resume=True)
    assert report.added == 40 and verify("x", tmp_path, sample=0).ok


def test_the_command_line_reports_a_full_disk_in_one_line(tmp_path, corpora, encoder):
    a, b = corpora
    build(a, "x", CONFIG, tmp_path, encoder=encoder)
    limit = _largest_file(tmp_path) // 2

    def starve():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "retrieval.cli", "add", "x", str(b), "--no-progress"]
    cmd += ["--workers", "0", "--index-dir", str(tmp_path)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=starve, timeout=300)
    assert done.returncode == 1, (done.stdout, done.stderr, time.perf_counter() - started)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: out of disk space"), done.stderr
    assert "Traceback" not in done.stderr
    assert verify("x", tmp_path, sample=0).ok
