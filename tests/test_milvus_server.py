"""The Milvus backend on a real Milvus server (the PyPI package `milvus`: Milvus 2.3 standalone,
started here on a free port): HTTP URIs, HNSW, aliases, two `serve` processes reading while an
`add` writes, the lock between two machines' folders, and the server going away mid-add."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from conftest import wait_until_serving

milvus = pytest.importorskip("milvus")
pytest.importorskip("pymilvus")

from retrieval.corpus import synthetic  # noqa: E402
from retrieval.errors import RetrievalError  # noqa: E402
from retrieval.index import lifecycle  # noqa: E402
from retrieval.index.build import build  # noqa: E402
from retrieval.index.config import BuildConfig  # noqa: E402
from retrieval.index.milvus import collections as coll  # noqa: E402
from retrieval.index.milvus.client import connect  # noqa: E402
from retrieval.index.milvus.lock import lock  # noqa: E402
from retrieval.index.verify import verify  # noqa: E402
from retrieval.model.encoder import Encoder  # noqa: E402
from retrieval.model.spec import ModelSpec  # noqa: E402
from retrieval.query.search import Query, Searcher  # noqa: E402

CONFIG = BuildConfig(progress=False, workers=0, shard_size=16, batch_size=16)
TINY = ["--model", "tiny-vit", "--random-init", "--no-progress", "--workers", "0"]
GRACEFUL_MS = 1000  # the test server's Bounded staleness; writers wait it out on every change
# The test server's settings beyond the package's defaults, each to spend less time waiting:
SERVER_CONFIG = {
    # Bounded reads lag at most 1 s (Milvus's default: 5 s); the engine is told so through
    # $RETRIEVAL_MILVUS_GRACEFUL_MS, which the `server` fixture sets for this module.
    "common.gracefulTime": GRACEFUL_MS,
    # A killed server's sessions expire after 10 s (30 s): its successor serves reads sooner.
    "common.session.ttl": 10,
    # Row allocations in a segment expire after 200 ms (2 s), which a flush waits out.
    "dataCoord.segment.assignmentExpiration": 200,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Milvus standalone server with its own data folder; (its URI, the server)."""
    with socket.socket() as probe:  # the embedded etcd's peer port is fixed: one server a host
        if probe.connect_ex(("127.0.0.1", 2380)) == 0:
            pytest.fail("another Milvus server runs here (its etcd holds port 2380): stop it")
    ports = {k: _free_port() for k in milvus.MilvusServer().config_keys if k.endswith("_port")}
    srv = milvus.MilvusServer(**ports)
    data = tmp_path_factory.mktemp("milvus-data")
    srv.set_base_dir(str(data))
    for key, value in SERVER_CONFIG.items():
        srv.config.set(key, value)
    # Set for this module's engine calls and the commands it starts (they inherit os.environ).
    before = os.environ.get(coll.GRACEFUL_ENV)
    os.environ[coll.GRACEFUL_ENV] = str(GRACEFUL_MS)
    try:
        srv.start()
        _check_configured(data / "configs" / "milvus.yaml")
        yield f"http://127.0.0.1:{srv.listen_port}", srv
    finally:
        srv.stop()
        if before is None:
            os.environ.pop(coll.GRACEFUL_ENV, None)
        else:
            os.environ[coll.GRACEFUL_ENV] = before


def _check_configured(config: Path) -> None:
    """The server's configuration file holds `SERVER_CONFIG` (the package writes each key only
    where its template has the line): a staleness the engine is not told of would be unsafe."""
    text = config.read_text()
    for key, value in SERVER_CONFIG.items():
        leaf = key.rsplit(".", 1)[1]
        assert re.search(rf"^ +{leaf}: {value}\b", text, re.M), f"{key} not set in {config}"


def _ids(root: Path, name: str, encoder) -> list[str]:
    with Searcher.open(name, root, encoder=encoder) as s:
        return sorted(r["id"] for r in s.search(Query(text="a shape"), k=1000)["results"])


def test_a_server_index_with_hnsw_ranks_as_the_exact_faiss_one(tmp_path, server, encoder):
    uri, _ = server
    corpus = synthetic.generate(tmp_path / "c", n=50, seed=3)
    root = tmp_path / "ix"
    build(corpus, "f", CONFIG, root, encoder=encoder)
    milvus_config = replace(CONFIG, backend="milvus", milvus_uri=uri, index="HNSW")
    build(corpus, "hnsw", milvus_config, root, encoder=encoder)
    build(corpus, "hnsw", milvus_config, root, encoder=encoder)  # a rebuild: the alias moves
    client = connect(uri)
    names = coll.Names(coll.base_name("hnsw"))
    assert coll.current(client, names) == names.items(2)
    assert client.describe_index(names.items(2), "vector")["index_type"] == "HNSW"
    client.close()
    with (
        Searcher.open("f", root, encoder=encoder) as f,
        Searcher.open("hnsw", root, encoder=encoder) as m,
    ):
        for strategy in ("cosine", "qbnorm", "hybrid"):
            for target in ("images", "captions"):
                args = {"k": 10, "strategy": strategy, "target": target}
                q = Query(text="a blue square above a red circle")
                want = [r["score"] for r in f.search(q, **args)["results"]]
                got = [r["score"] for r in m.search(q, **args)["results"]]
                assert got == pytest.approx(want, abs=1e-5), (strategy, target)
    assert verify("hnsw", root, sample=3, encoder=encoder).ok


def _serve(root: Path, name: str, logs: list[Path]) -> list[tuple[subprocess.Popen, str]]:
    """`retrieval serve` processes, one per log file, started together; once all answer."""
    started = []
    for log in logs:
        port = _free_port()
        cmd = [sys.executable, "-m", "retrieval.cli", "serve", name, "--index-dir", str(root)]
        out = log.open("w")
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
        started.append((proc, f"http://127.0.0.1:{port}", log))
    deadline = time.monotonic() + 90
    try:
        for proc, url, log in started:
            wait_until_serving(proc, url, log, deadline)
    except BaseException:
        for proc, _, _ in started:
            proc.kill()
        raise
    return [(proc, url) for proc, url, _ in started]


def test_two_servers_read_while_an_add_writes(tmp_path, server, encoder):
    uri, _ = server
    a = synthetic.generate(tmp_path / "a", n=30, seed=4)
    b = synthetic.generate(tmp_path / "b", n=60, seed=5)
    root = tmp_path / "ix"
    build(a, "shared", replace(CONFIG, backend="milvus", milvus_uri=uri), root, encoder=encoder)
    before = _ids(root, "shared", encoder)
    servers = _serve(root, "shared", [tmp_path / f"serve{i}.log" for i in range(2)])
    seen: list[frozenset] = []
    errors: list[str] = []
    stop = threading.Event()
    fresh = {url: threading.Event() for _, url in servers}  # set once it shows all 90 items

    def poll(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/search", json={"text": "a shape", "k": 1000})
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    ids = frozenset(x["id"] for x in r.json()["results"])
                    seen.append(ids)
                    if len(ids) == 90:
                        fresh[url].set()

    pollers = [threading.Thread(target=poll, args=(url,)) for _, url in servers]
    try:
        for t in pollers:
            t.start()
        lifecycle.add(b, "shared", root, CONFIG, encoder=encoder)
        for url, answered in fresh.items():  # both servers answer from the new state too
            assert answered.wait(timeout=60), f"{url} never answered with the added items"
    finally:
        stop.set()
        for t in pollers:
            t.join()
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)
    after = _ids(root, "shared", encoder)
    assert not errors, errors[:3]
    assert {frozenset(before), frozenset(after)} >= set(seen)  # never half an add
    assert frozenset(after) in seen and len(after) == 90


def test_the_lock_holds_between_two_machines_folders(tmp_path, server, encoder):
    # Index folders (machines' copies of the manifest) on one server's collections: their file
    # locks are independent, so only Milvus's lock row keeps the writers apart.
    uri, _ = server
    a = synthetic.generate(tmp_path / "a", n=20, seed=4)
    b = synthetic.generate(tmp_path / "b", n=30, seed=5)
    one, two, three = (tmp_path / f"machine{i}" for i in (1, 2, 3))
    build(a, "team", replace(CONFIG, backend="milvus", milvus_uri=uri), one, encoder=encoder)
    shutil.copytree(one, two, symlinks=True)
    shutil.copytree(one, three, symlinks=True)
    add = [sys.executable, "-m", "retrieval.cli", "add", "team", str(b), *TINY, "--index-dir"]
    client = connect(uri)
    names = coll.Names(coll.base_name("team"))
    with lock(client, names):  # machine 1 is changing the index
        # Machines 2 and 3 start at once (each spends most of its time loading the engine);
        # each holds its own folder's file lock, so only the lock row stops either.
        waiting = subprocess.Popen(
            [*add, str(two), "--wait", "120"], stderr=subprocess.PIPE, text=True
        )
        said, told = _watch(waiting.stderr, "waiting up to 120s")
        refused = subprocess.run([*add, str(three)], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1, refused.stderr
        assert "are being changed by" in refused.stderr and "Traceback" not in refused.stderr
        assert told.wait(timeout=120), "".join(said)  # the second writer waits for the lock
        assert waiting.poll() is None
    client.close()
    assert waiting.wait(timeout=300) == 0, "".join(said)
    assert len(_ids(one, "team", encoder)) == 20 + 30 == len(_ids(two, "team", encoder))


def _watch(stream, text: str) -> tuple[list[str], threading.Event]:
    """The lines of ``stream`` as they come (read to its end in a thread, so the writer never
    blocks on a full pipe), and an event set once a line holds ``text``."""
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in stream:
            lines.append(line)
            if text in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    return lines, seen


def test_a_machine_whose_manifest_names_another_model_is_told_so(tmp_path, server, encoder):
    # Machine 1 rebuilds the shared index with another model; machine 2 still has the old
    # manifest: its searches would encode with the wrong model, so they are refused in one line.
    uri, _ = server
    a = synthetic.generate(tmp_path / "a", n=12, seed=4)
    one, two = tmp_path / "machine1", tmp_path / "machine2"
    config = replace(CONFIG, backend="milvus", milvus_uri=uri)
    build(a, "shared-model", config, one, encoder=encoder)
    shutil.copytree(one, two, symlinks=True)
    other = Encoder.load(ModelSpec("small-vit", random_init=True), "cpu")
    build(a, "shared-model", replace(config, model=other.spec), one, encoder=other)
    with pytest.raises(RetrievalError) as refused:
        Searcher.open("shared-model", two, encoder=encoder).search(Query(text="a shape"))
    line = str(refused.value)
    assert "small-vit" in line and "tiny-vit" in line and "\n" not in line


def test_the_server_going_away_during_an_add_leaves_the_index_and_a_rerun_finishes(
    tmp_path, server, encoder
):
    uri, srv = server
    a = synthetic.generate(tmp_path / "a", n=20, seed=4)
    b = synthetic.generate(tmp_path / "b", n=150, seed=5)
    root = tmp_path / "ix"
    build(a, "gone", replace(CONFIG, backend="milvus", milvus_uri=uri), root, encoder=encoder)
    before = _ids(root, "gone", encoder)
    big = replace(CONFIG, shard_size=150, batch_size=50)  # one shard: encoded, then written

    def stop_when_writing():
        client = connect(uri)
        names = coll.Names(coll.base_name("gone"))
        while (coll.read_state(client, names, names.items(1)).pending or {}).get("op") != "add":
            time.sleep(0.05)
        srv.stop()

    killer = threading.Thread(target=stop_when_writing)
    killer.start()
    with pytest.raises(RetrievalError) as failed:
        lifecycle.add(b, "gone", root, big, encoder=encoder)
    killer.join()
    assert "Milvus" in str(failed.value) and "\n" not in str(failed.value)
    srv.start()
    assert _ids(root, "gone", encoder) == before  # the half-written add is invisible
    lifecycle.add(b, "gone", root, big, encoder=encoder, resume=True)
    assert len(_ids(root, "gone", encoder)) == 170
    assert verify("gone", root, sample=2, encoder=encoder).ok


def test_torchrun_ranks_insert_their_own_shards_into_the_server(tmp_path, server, encoder):
    uri, _ = server
    corpus = synthetic.generate(tmp_path / "c", n=45, seed=8)  # 6 shards of 8: uneven shares
    root = tmp_path / "ix"
    options = ["--shard-size", "8", "--batch-size", "8", *TINY]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), "-m", "retrieval.cli", "build", str(corpus)]
    cmd += ["--name", "two", "--backend", "milvus", "--milvus-uri", uri, "--index-dir", str(root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, *options], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoded by 2 processes" in done.stdout
    build(corpus, "one", replace(CONFIG, shard_size=8, batch_size=8), root, encoder=encoder)
    client = connect(uri)
    items = coll.current(client, coll.Names(coll.base_name("two")))
    got = client.query(items, filter="row >= 0", output_fields=["row", "id", "qbnorm"], limit=1000)
    client.close()
    with Searcher.open("one", root, encoder=encoder) as one:
        want = {
            row: (item["id"], round(float(one.space.image_norm[row]), 4))
            for item in one.store.iter_items()
            for row in [item["row"]]
        }
    assert {
        r["row"]: (r["id"], round(r["qbnorm"], 4)) for r in got
    } == want  # the same rows, ids and normalisers as one process's FAISS index
    assert verify("two", root, sample=3, encoder=encoder).ok
