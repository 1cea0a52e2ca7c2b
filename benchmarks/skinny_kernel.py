"""Experiment (issue #4): a hand-written AVX2 kernel for exact search's skinny products.

Compiles ``skinny_kernel.c`` with gcc into a temporary folder (x86-64 with AVX2 and FMA
only), then times it on two threads against numpy's product of the same shape and the
machine's GEMM, best of 5, interleaved, at several prefetch distances. Scores only, no top-k:
the question is whether the product itself can reach 80% of GEMM at 16 and 64 queries.

    python benchmarks/skinny_kernel.py --n 100000
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

D = 512
SOURCE = Path(__file__).with_name("skinny_kernel.c")


def compile_kernel(folder: Path, prefetch: int) -> ctypes.CDLL:
    lib = folder / f"skinny_pf{prefetch}.so"
    cmd = ["gcc", "-O3", "-mavx2", "-mfma", f"-DPF={prefetch}", "-shared", "-fPIC"]
    subprocess.run([*cmd, "-o", str(lib), str(SOURCE)], check=True)
    dll = ctypes.CDLL(str(lib))
    ptr = ctypes.c_void_p
    dll.scores16.argtypes = [ptr, ctypes.c_int64, ctypes.c_int, ptr, ctypes.c_int, ptr]
    return dll


def kernel_scores(dll, xb: np.ndarray, q: np.ndarray, threads: int = 2, tile: int = 4096):
    """(N, Q) scores; Q a multiple of 16. ctypes drops the GIL, so threads run in parallel."""
    groups = len(q) // 16
    packed = np.ascontiguousarray(q.reshape(groups, 16, D).transpose(0, 2, 1))  # (G, D, 16)
    out = np.empty((len(xb), len(q)), np.float32)

    def work(lo: int, hi: int) -> None:
        for s in range(lo, hi, tile):
            e = min(hi, s + tile)
            dll.scores16(
                xb[s:].ctypes.data, e - s, D, packed.ctypes.data, groups, out[s:].ctypes.data
            )

    cuts = np.linspace(0, len(xb), threads + 1).astype(int)
    pool = [threading.Thread(target=work, args=(cuts[i], cuts[i + 1])) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return out


def best_of(fn, reps: int = 5) -> float:
    fn()
    best = np.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--prefetch", default="1,2,8,16", help="distances, in blocks of 6 rows")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.n, D), dtype=np.float32)
    a = rng.standard_normal((4096, D), dtype=np.float32)
    b = rng.standard_normal((D, 8192), dtype=np.float32)
    gemm = 2 * 4096 * D * 8192 / best_of(lambda: a @ b) / 1e9
    print(f"GEMM {gemm:.1f} GFLOP/s; N = {args.n:,}, D = {D}")
    with tempfile.TemporaryDirectory() as tmp:
        for pf in (int(p) for p in args.prefetch.split(",")):
            dll = compile_kernel(Path(tmp), pf)
            for nq in (16, 64):
                q = rng.standard_normal((nq, D), dtype=np.float32)
                err = np.abs(kernel_scores(dll, xb, q) - xb @ q.T).max()
                flops = 2 * nq * args.n * D / 1e9
                ours = flops / best_of(lambda q=q, dll=dll: kernel_scores(dll, xb, q))
                blas = flops / best_of(lambda q=q: xb @ q.T)
                print(
                    f"prefetch {pf:>2}, {nq:>2} queries: kernel {ours:6.1f} GFLOP/s "
                    f"({ours / gemm:.0%} of GEMM), numpy {blas:6.1f} ({blas / gemm:.0%}); "
                    f"max |error| {err:.1e}"
                )


if __name__ == "__main__":
    main()
