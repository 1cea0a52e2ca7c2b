"""The packed skinny-product kernel against brute force: awkward sizes, ties, bad buffers."""

from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import unit_rows

from retrieval.index import packed
from retrieval.index.exact import exact_search
from retrieval.index.packed import PackedBase
from retrieval.index.vector_index import PACK_MIN_VECTORS, VectorIndex

needs_kernel = pytest.mark.skipif(not packed.available(), reason="packed kernel not built here")


def _cpu_has_avx2() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and {"avx2", "fma"} <= set(cpuinfo.read_text().split())


@pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() == "x86_64" and _cpu_has_avx2()),
    reason="the kernel is built and run on x86-64 Linux with AVX2 + FMA only",
)
def test_kernel_is_built_where_the_cpu_can_run_it():
    # The extension is optional at install time; here it must have been built, or the
    # tests below would be skipped and exact search would silently be the slower BLAS path.
    assert packed.available()


def integer_rows(n: int, d: int, seed: int) -> np.ndarray:
    """Small integers as float32: every inner product is exact, in any summation order."""
    return np.random.default_rng(seed).integers(-4, 5, (n, d)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 5, 6, 7, 1003])
def test_pack_interleaves_six_rows_by_dimension_and_pads_with_zeros(n):
    xb = integer_rows(n, 13, seed=n)
    blocks = PackedBase.pack(xb).blocks
    assert blocks.shape == (-(-n // 6), 13, 6)
    rows = blocks.transpose(0, 2, 1).reshape(-1, 13)
    np.testing.assert_array_equal(rows[:n], xb)
    assert not rows[n:].any()


@needs_kernel
@pytest.mark.parametrize(
    ("n", "d", "nq", "k", "threads"),
    [(7, 3, 1, 6, 2), (1003, 13, 17, 10, 2), (601, 64, 70, 25, 3), (2_000, 1, 130, 9, 1)],
)
def test_top_matches_brute_force_scores_on_awkward_sizes(n, d, nq, k, threads):
    xb, q = integer_rows(n, d, seed=n), integer_rows(nq, d, seed=n + 1)
    scores, rows = PackedBase.pack(xb).top(q, k, threads)
    full = q @ xb.T  # (nq, n), exact
    want = -np.sort(-full, axis=1)[:, :k]
    np.testing.assert_array_equal(scores, want)  # the k best scores, best first
    np.testing.assert_array_equal(np.take_along_axis(full, rows, 1), scores)  # of those rows
    assert all(len(set(r)) == k for r in rows.tolist())  # no row twice
    for s, r in zip(scores, rows, strict=True):  # equal scores by lower row
        assert np.lexsort((r, -s)).tolist() == list(range(k))


@needs_kernel
def test_queries_at_an_odd_byte_offset_are_copied_before_c_reads_them():
    xb, q = integer_rows(9_001, 8, seed=21), integer_rows(20, 8, seed=22)
    raw = bytearray(2) + q.tobytes()
    odd = np.frombuffer(raw, np.float32, offset=2).reshape(q.shape)  # contiguous, unaligned
    assert odd.flags.c_contiguous and not odd.flags.aligned
    base = PackedBase.pack(xb)
    want = base.top(q, 4)
    seen = []

    class Recording:  # the real workers, noting whether C was handed aligned queries
        threads = base._workers.threads

        def topk(self, *args):
            seen.append(args[3].flags.aligned)
            return real.topk(*args)

    real = base._workers
    object.__setattr__(base, "_workers", Recording())
    got = base.top(odd, 4)
    object.__setattr__(base, "_workers", real)
    assert seen and all(seen)
    np.testing.assert_array_equal(got[0], want[0])  # rows tied at the cut may differ
    np.testing.assert_array_equal(np.take_along_axis(q @ xb.T, got[1], 1), got[0])


@needs_kernel
@pytest.mark.parametrize(
    ("n", "threads"), [(2, 2), (7, 3), (193, 2), (1_000, 1), (1_000, 2), (6_001, 3)]
)
def test_every_row_is_scanned_exactly_once(n, threads):
    # k = n - 1 keeps every row but the worst: a row scanned twice, by two threads or at a claim
    # boundary, shows up twice, and a row skipped is missing.
    xb = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    q = np.ones((16, 4), np.float32)
    k = n - 1
    scores, rows = PackedBase.pack(xb).top(q, k, threads)
    want = np.arange(n - 1, 0, -1)
    np.testing.assert_array_equal(rows, np.broadcast_to(want, rows.shape))
    np.testing.assert_array_equal(scores, 4 * rows.astype(np.float32))


@needs_kernel
def test_one_base_searched_from_several_threads_at_once():
    # One search at a time has the base's helper threads; the others scan alone. Each must
    # still get its own queries' results.
    xb = integer_rows(3_001, 24, seed=4)
    base = PackedBase.pack(xb)
    batches = [integer_rows(20, 24, seed=10 + i) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(lambda q=q: base.top(q, 5, 2)[0]) for q in batches]
        got = [f.result(timeout=60) for f in futures]  # a deadlock fails instead of hanging
    for q, scores in zip(batches, got, strict=True):
        np.testing.assert_array_equal(scores, -np.sort(-(q @ xb.T), axis=1)[:, :5])


@needs_kernel
def test_a_packed_base_pickles_and_copies_with_workers_of_its_own():
    xb, q = integer_rows(700, 9, seed=5), integer_rows(16, 9, seed=6)
    base = PackedBase.pack(xb)
    want = base.top(q, 4, 2)[0]
    for clone in (pickle.loads(pickle.dumps(base)), copy.deepcopy(base)):
        assert clone._workers is not base._workers and clone.n == base.n
        np.testing.assert_array_equal(clone.top(q, 4, 2)[0], want)


def brute_force_ids(xb, ids, q, k):
    s = q @ xb.T
    return [ids[sorted(range(len(row)), key=lambda j: (-row[j], ids[j]))[:k]] for row in s]


@needs_kernel
@pytest.mark.parametrize(("n", "nq", "k"), [(1_001, 16, 10), (3_000, 65, 3), (500, 20, 100)])
def test_exact_search_through_the_packed_base_matches_brute_force(n, nq, k):
    xb, q = unit_rows(n, 40, seed=n), unit_rows(nq, 40, seed=n + 1)
    ids = np.random.default_rng(n).permutation(n).astype(np.int64) * 3 + 1
    got = exact_search(xb, ids, q, k, PackedBase.pack(xb))
    row_of = {int(i): r for r, i in enumerate(ids)}
    for query, nb, want in zip(q, got, brute_force_ids(xb, ids, q, k), strict=True):
        np.testing.assert_array_equal(nb.ids, want)
        want_scores = xb[[row_of[int(i)] for i in want]] @ query
        np.testing.assert_allclose(nb.scores, want_scores, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_ties_across_blocks_and_threads_go_to_the_lower_id():
    xb = np.repeat(unit_rows(3, 16, seed=6), [1500, 1500, 1001], axis=0)
    ids = np.random.default_rng(7).permutation(len(xb)).astype(np.int64)
    got = exact_search(xb, ids, np.repeat(xb[:1], 20, axis=0), 4, PackedBase.pack(xb))
    assert all(nb.ids.tolist() == sorted(ids[:1500].tolist())[:4] for nb in got)


@needs_kernel
def test_flat_index_packs_on_first_batch_and_matches_the_unpacked_search():
    n = PACK_MIN_VECTORS + 5
    xb, q = unit_rows(n, 24, seed=1), unit_rows(33, 24, seed=2)
    ids = np.arange(n, dtype=np.int64) * 2
    index = VectorIndex.build(xb, ids, "Flat")
    single = [index.search(q[i : i + 1], 7)[0] for i in range(len(q))]  # BLAS, no packing
    assert index._packed is None
    batched = index.search(q, 7)
    assert index._packed is not None
    for a, b in zip(single, batched, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    new = unit_rows(1, 24, seed=3)
    index.add(new, np.array([10**9], np.int64))
    assert index._packed is None  # stale after an add: packed again on the next batch
    assert all(nb.ids.tolist() == [10**9] for nb in index.search(np.repeat(new, 16, 0), 1))
    assert index._packed is not None and index._packed.n == n + 1


@needs_kernel
def test_bad_buffers_raise_instead_of_reading_past_them():
    base = PackedBase.pack(unit_rows(12, 8, seed=0))
    topk = base._workers.topk
    q = np.zeros((5, 8), np.float32)
    hs, hr = np.empty((2, 16, 3), np.float32), np.empty((2, 16, 3), np.int64)
    s, r = np.empty((5, 3), np.float32), np.empty((5, 3), np.int64)
    with pytest.raises(ValueError, match="packed base"):
        topk(base.blocks, 13, 8, q, 5, 3, hs, hr, 2, s, r)
    with pytest.raises(ValueError, match="heap rows"):
        topk(base.blocks, 12, 8, q, 5, 3, hs, hr[:1].copy(), 2, s, r)  # one set, not two
    with pytest.raises(ValueError, match="queries"):
        topk(base.blocks, 12, 8, q, 6, 3, hs, hr, 1, s, r)
    with pytest.raises(ValueError, match="heap scores"):
        topk(base.blocks, 12, 8, np.zeros((17, 8), np.float32), 17, 3, hs, hr, 2, s, r)
    with pytest.raises(ValueError, match="^scores"):
        topk(base.blocks, 12, 8, q, 5, 3, hs, hr, 1, s[:4].copy(), r)
    with pytest.raises(ValueError, match="^rows"):
        topk(base.blocks, 12, 8, q, 5, 3, hs, hr, 1, s, r[:4].copy())
    for nq, threads in ((5, 0), (0, 1)):
        with pytest.raises(ValueError, match="bad sizes"):
            topk(base.blocks, 12, 8, q, nq, 3, hs, hr, threads, s, r)
    with pytest.raises(ValueError, match="out of range"):  # sizes whose products would overflow
        topk(base.blocks, 12, 8, q, 5, 2**60, hs, hr, 1, s, r)
    with pytest.raises(ValueError, match="float32"):
        PackedBase(base.blocks.astype(np.float64), 12)
    with pytest.raises(ValueError, match="cannot hold"):
        PackedBase(base.blocks, 13)
    frozen = s.copy()
    frozen.flags.writeable = False
    with pytest.raises(TypeError):
        topk(base.blocks, 12, 8, q, 5, 3, hs, hr, 1, frozen, r)
    with pytest.raises(ValueError, match="threads"):
        packed._skinny.Workers(0)
    with pytest.raises(ValueError, match="threads"):
        packed._skinny.Workers(2_000)


def _heap_sets(base: PackedBase, workers, q: np.ndarray, k: int, sets: int, threads: int):
    """Call the C search directly for 16 queries: the (sets, 16, k) heap scores and rows it
    leaves behind, one set per thread (scratch the caller hands it), and the merged result."""
    hs, hr = np.full((sets, 16, k), 7.0, np.float32), np.full((sets, 16, k), 7, np.int64)
    scores, rows = np.empty((16, k), np.float32), np.empty((16, k), np.int64)
    workers.topk(base.blocks, base.n, base.dim, q, 16, k, hs, hr, threads, scores, rows)
    return hs, hr, scores, rows


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_a_search_uses_no_more_heap_sets_than_threads_asked_for(threads):
    # A pool larger than the search: helpers not asked must not write, and the heap sets of
    # the threads asked for hold each row at most once and, merged, the k best.
    xb, q = integer_rows(20_000, 8, seed=11), integer_rows(16, 8, seed=12)
    base, workers = PackedBase.pack(xb), packed._skinny.Workers(4)
    _heap_sets(base, workers, q, 6, 4, 4)  # all three helpers started, and spinning
    hs, hr, scores_out, rows_out = _heap_sets(base, workers, q, 6, 4, threads)
    # Sets past `threads` are left as they were: no helper beyond the search wrote there.
    assert (hr[threads:] == 7).all() and (hs[threads:] == 7.0).all()
    rows = hr[:threads].transpose(1, 0, 2).reshape(16, -1)
    scores = hs[:threads].transpose(1, 0, 2).reshape(16, -1)
    want = -np.sort(-(q @ xb.T), axis=1)[:, :6]
    np.testing.assert_array_equal(-np.sort(-scores, axis=1)[:, :6], want)
    for r in rows:
        real = r[r >= 0]
        assert len(set(real.tolist())) == len(real)
    # Merged in C: the k best scores, each its row's own, equal scores by lower row.
    full = q @ xb.T
    np.testing.assert_array_equal(scores_out, want)
    np.testing.assert_array_equal(np.take_along_axis(full, rows_out, 1), scores_out)
    for s, r in zip(scores_out, rows_out, strict=True):
        assert np.lexsort((r, -s)).tolist() == list(range(6))


@needs_kernel
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: helpers may never run")
def test_helpers_take_part_in_back_to_back_searches():
    # A helper that wakes late may stay out of a search; back to back, one must join.
    xb, q = integer_rows(120_000, 8, seed=13), integer_rows(16, 8, seed=14)
    base, workers = PackedBase.pack(xb), packed._skinny.Workers(2)
    joined = [(_heap_sets(base, workers, q, 4, 2, 2)[1][1] >= 0).any() for _ in range(20)]
    assert any(joined)


@needs_kernel
def test_searches_with_idle_gaps_mixed_threads_and_fresh_bases():
    # Gaps longer than the helpers' 2 ms spin send them to sleep, so they are woken by a
    # signal and may join late or not at all; two callers share the helpers; bases are freed
    # right after a search. Every result must still be exact.
    xb = integer_rows(9_001, 8, seed=15)
    shared = PackedBase.pack(xb)
    want_of = {}

    def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i in range(12):
            q = integer_rows(16, 8, seed=seed * 100 + i)
            base = shared if i % 3 else PackedBase.pack(xb)
            time.sleep(float(rng.choice([0.0, 0.001, 0.004])))
            got = base.top(q, 5, int(rng.integers(1, 4)))[0]
            want_of[(seed, i)] = np.array_equal(got, -np.sort(-(q @ xb.T), axis=1)[:, :5])

    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(caller, seed) for seed in (1, 2)]:
            f.result(timeout=60)
    assert len(want_of) == 24 and all(want_of.values())


@needs_kernel
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to narrow to one")
def test_helpers_stay_within_the_callers_cpus_when_narrowed_after_packing():
    xb, q = integer_rows(30_000, 8, seed=16), integer_rows(16, 8, seed=17)
    base = PackedBase.pack(xb)  # made while the process may use every CPU
    before = os.sched_getaffinity(0)
    one = min(before)
    os.sched_setaffinity(0, {one})
    try:
        tasks = {t.name for t in Path("/proc/self/task").iterdir()}
        np.testing.assert_array_equal(base.top(q, 3, 2)[0], -np.sort(-(q @ xb.T), axis=1)[:, :3])
        helpers = {t.name for t in Path("/proc/self/task").iterdir()} - tasks  # started now
        assert helpers
        assert all(os.sched_getaffinity(int(tid)) <= {one} for tid in helpers)
    finally:
        os.sched_setaffinity(0, before)


@needs_kernel
def test_queries_of_the_wrong_shape_are_refused():
    base = PackedBase.pack(integer_rows(12, 8, seed=0))
    with pytest.raises(ValueError, match=r"queries must be \(Q, 8\)"):
        base.top(np.arange(8, dtype=np.float32), 2)
    with pytest.raises(ValueError, match="queries must be"):
        base.top(np.zeros((16, 7), np.float32), 2)


def _search_in_child(base: PackedBase, q: np.ndarray, out) -> None:
    out.put(base.top(q, 3, 2)[0])


@needs_kernel
@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_searches_a_base_made_before_the_fork():
    # The child has no helper threads (fork copies only the calling thread): it scans alone.
    xb, q = integer_rows(2_000, 8, seed=8), integer_rows(16, 8, seed=9)
    base = PackedBase.pack(xb)
    want = -np.sort(-(q @ xb.T), axis=1)[:, :3]
    np.testing.assert_array_equal(base.top(q, 3, 2)[0], want)  # helpers started, spinning
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_search_in_child, args=(base, q, out), daemon=True)
    child.start()
    try:
        got = out.get(timeout=60)  # a hang in the child fails here instead of blocking
        child.join(timeout=60)
    finally:
        child.kill()
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(base.top(q, 3, 2)[0], want)  # the parent's helpers still work


@needs_kernel
def test_k_of_at_least_the_base_size_is_refused():
    base = PackedBase.pack(integer_rows(4, 3, seed=0))
    with pytest.raises(ValueError, match="k must be in 1..3"):
        base.top(integer_rows(16, 3, seed=1), 4)
