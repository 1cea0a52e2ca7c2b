"""Distributed encoding: `torchrun -m retrieval.cli build` with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from retrieval.corpus import synthetic
from retrieval.index import layout
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.index.manifest import CAPTION_INDEX, IMAGE_INDEX
from retrieval.index.store import Store
from retrieval.index.vector_index import VectorIndex


def _state(root, name):
    folder = layout.resolve(name, root)
    with Store.open(folder / layout.STORE) as store:
        items = sorted((it["id"], it["row"]) for it in store.iter_items())
    vectors = {}
    for kind, file in (("image", IMAGE_INDEX), ("caption", CAPTION_INDEX)):
        index = VectorIndex.load(folder / file, "Flat")
        vectors[kind] = index.vectors(np.sort(index.ids()))
    return items, vectors


def test_two_processes_build_the_index_one_process_builds(tmp_path, encoder):
    corpus = synthetic.generate(tmp_path / "c", n=45, seed=8)  # 6 shards of 8: uneven shares
    options = ["--shard-size", "8", "--batch-size", "8", "--workers", "0", "--no-progress"]
    options += ["--model", "tiny-vit", "--random-init"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(29900 + os.getpid() % 90), "-m", "retrieval.cli", "build"]
    cmd += [str(corpus), "--name", "two", "--index-dir", str(tmp_path / "ix"), *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("index 'two': 45 images") == 1  # rank 0 alone reports
    assert "encoded by 2 processes" in done.stdout
    config = BuildConfig(progress=False, workers=0, shard_size=8, batch_size=8)
    build(corpus, "one", config, tmp_path / "ix", encoder=encoder)
    two, one = _state(tmp_path / "ix", "two"), _state(tmp_path / "ix", "one")
    assert two[0] == one[0]  # same ids on the same rows
    for kind in one[1]:
        np.testing.assert_allclose(two[1][kind], one[1][kind], atol=1e-5)
    assert not layout.spool_dir(tmp_path / "ix", "two").exists()


def _ranks(tmp_path, args_of_rank, port, torchrun=True):
    """Start two ranks as two one-process "nodes" (so no agent stops the other for us): under
    torchrun, or started by hand with the environment variables torchrun would set."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    procs = []
    for rank, args in enumerate(args_of_rank):
        if torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
            cmd += ["--node-rank", str(rank), "--nproc-per-node", "1", "--master-addr"]
            cmd += ["127.0.0.1", "--master-port", str(port), "-m", "retrieval.cli", *args]
            extra = {}
        else:
            cmd = [sys.executable, "-m", "retrieval.cli", *args]
            extra = {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_PORT": str(port)}
        procs.append(
            subprocess.Popen(
                cmd, env={**env, **extra}, cwd=tmp_path, stderr=subprocess.PIPE, text=True
            )
        )
    return [(p.wait(timeout=120), p.stderr.read()) for p in procs]


def test_a_rank_that_fails_before_joining_stops_the_others_with_its_line(tmp_path):
    synthetic.generate(tmp_path / "c", n=40, seed=8)
    options = ["--workers", "0", "--no-progress", "--model", "tiny-vit", "--random-init"]
    for torchrun in (True, False):
        port = 29000 + (os.getpid() + torchrun) % 800
        args = [["build", corpus, "--name", "x", *options] for corpus in ("c", "missing")]
        (rc0, err0), (rc1, err1) = _ranks(tmp_path, args, port, torchrun)
        assert rc1 != 0 and "'missing' does not exist" in err1
        assert rc0 == 1, err0
        assert "stopped because rank 1 failed: " in err0 and "'missing' does not exist" in err0
        assert "Traceback" not in err0.split("Error: stopped")[0]  # the rank's own output


def test_a_rank_that_fails_after_joining_stops_the_others_with_its_line(tmp_path):
    synthetic.generate(tmp_path / "c", n=40, seed=8)
    options = ["--workers", "0", "--no-progress", "--random-init", "--epochs", "1"]
    args = [["train", "c", "--out", "run", *options, "--model", m] for m in ("tiny-vit", "nope")]
    (rc0, err0), (rc1, err1) = _ranks(tmp_path, args, 29800 + os.getpid() % 90)
    assert rc1 != 0 and "unknown model 'nope'" in err1
    assert rc0 == 1 and "stopped because rank 1 failed: unknown model 'nope'" in err0
