"""Load on `retrieval serve`: N requests from C concurrent clients on loopback, over the demo index.

    .venv/bin/python benchmarks/serve_load.py --requests 2000 --clients 32 --json /tmp/load.json

The index is the demo's (400 synthetic scenes, the shipped tiny model), built in a temporary
folder; the server is the real `retrieval serve` command in its own process. Clients are
asyncio tasks sharing one httpx connection pool (32 connections), each sending its next
request as soon as the previous answer arrives: 90% text queries (captions of the corpus,
default strategy, k=10), 10% image uploads (multipart, image->captions). The clients run on
the same 2 cores as the server, so the figures are a floor for a machine with a separate
client. Recorded: errors (any non-200 or transport error), throughput, latency percentiles,
and the server's resident memory (VmRSS) before and after, and its peak (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from retrieval.corpus import synthetic
from retrieval.corpus.readers import read_corpus
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.model.encoder import Encoder
from retrieval.model.spec import SHIPPED_MODEL, ModelSpec


def _rss(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)  # kB -> MiB
    return fields


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(root: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "retrieval.cli", "serve", "demo", "--index-dir", str(root)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server did not start; see {log}")


async def _load(url: str, jobs: list[dict], clients: int) -> tuple[list[float], list[str]]:
    latencies: list[float] = []
    errors: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                job = queue.get_nowait()
                t = time.perf_counter()
                try:
                    r = await client.post("/search", **job)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:100]}")
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, errors


def _jobs(corpus: Path, n: int, seed: int) -> list[dict]:
    records = list(read_corpus(corpus))
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        r = records[rng.integers(len(records))]
        if i % 10 == 9:
            files = {"image": ("q.png", Path(r.image).read_bytes(), "image/png")}
            jobs.append({"files": files, "data": {"k": "10"}})
        else:
            jobs.append({"json": {"text": r.captions[rng.integers(len(r.captions))], "k": 10}})
    return jobs


def run(requests: int, clients: int, n_items: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = synthetic.generate(tmp / "corpus", n=n_items, seed=0)
        encoder = Encoder.load(ModelSpec("tiny-vit", str(SHIPPED_MODEL)), device="cpu")
        build(corpus, "demo", BuildConfig(progress=False), tmp / "indexes", encoder=encoder)
        port = _port()
        proc = _start(tmp / "indexes", port, tmp / "server.log")
        try:
            url = f"http://127.0.0.1:{port}"
            httpx.post(f"{url}/search", json={"text": "warm up", "k": 10}, timeout=60)
            before = _rss(proc.pid)
            t = time.perf_counter()
            lat, errors = asyncio.run(_load(url, _jobs(corpus, requests, 0), clients))
            wall = time.perf_counter() - t
            after = _rss(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ms = np.array(lat) * 1000
    return {
        "requests": requests,
        "clients": clients,
        "items": n_items,
        "errors": len(errors),
        "error_samples": errors[:5],
        "seconds": round(wall, 2),
        "requests_per_s": round(requests / wall, 1),
        "latency_ms": {p: round(float(np.percentile(ms, q)), 1) for p, q in _PCTS.items()},
        "server_rss_mib": {"before": before["VmRSS"], "after": after["VmRSS"]},
        "server_peak_rss_mib": after["VmHWM"],
    }


_PCTS = {"p50": 50, "p90": 90, "p99": 99, "max": 100}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--items", type=int, default=400, help="demo corpus size")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = run(args.requests, args.clients, args.items)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
