"""Load on `retrieval serve`: batched against one-at-a-time, and clip-retrieval's back end.

    .venv/bin/python benchmarks/serve_load.py --clip-retrieval /tmp/cr-venv/bin/clip-retrieval \
        --json benchmarks/results/serve_load.json

For each model, one index of the demo corpus (400 synthetic scenes) built in a temporary folder:

- ``demo``: the shipped tiny model (`retrieval demo`'s);
- ``vit-b-32``: open_clip ViT-B-32 with random weights (seed 0) saved as a local checkpoint:
  the cost of a real model's towers, speed only.

Servers, each the real command in its own process, hit in turn by the same client script:

- ``batched``: `retrieval serve` as it starts by default (dynamic batching);
- ``one-at-a-time``: `retrieval serve --max-batch 1`;
- ``clip-retrieval back`` (ViT-B-32 only; it cannot load the package's own tiny config): its
  Flask server, from its own virtualenv, over the same embeddings exported by `retrieval
  embeddings` and indexed by `clip-retrieval index`, with the same checkpoint
  (``open_clip:ViT-B-32/<path>``).

Both engines run with their query caches off (`--cache-size 0`; clip-retrieval has none), so
every request is encoded. Clients are asyncio tasks, each with its own keep-alive connection (a
minimal HTTP/1.1 client, cheaper than httpx), each sending its next request as soon as the
previous answer arrives: 90%
text queries (captions of the corpus, k=10, images searched), 10% image queries (a corpus
image, base64 in JSON, captions searched). The clients run on the same 2 cores as the server,
so the figures are a floor for a machine with a separate client. Recorded per (model, server,
clients): errors (any non-200 or transport error), requests/s, latency percentiles, and for
ours the sizes of the batches the server formed (from ``/stats``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import open_clip
import torch
from machine import describe

from retrieval.corpus import synthetic
from retrieval.corpus.readers import read_corpus
from retrieval.index.build import build
from retrieval.index.config import BuildConfig, ExportConfig
from retrieval.index.export import export
from retrieval.model.encoder import Encoder
from retrieval.model.spec import SHIPPED_MODEL, ModelSpec

CLIENTS = (1, 8, 32, 128)
TARGET_SPEEDUP = 3.0  # batched / one-at-a-time requests/s at 32 clients, ViT-B-32
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
PROBES = 20  # requests drawn for the answer comparison (their text queries are sent)
_PCTS = {"p50": 50, "p90": 90, "p99": 99, "max": 100}


@dataclass(frozen=True)
class Server:
    """How to start one server and speak to it."""

    name: str
    command: list[str]
    ready_path: str  # GET answers 200 once it serves
    peer: bool = False  # clip-retrieval's /knn-service, not our /search


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(server: Server, port: int, log: Path) -> subprocess.Popen:
    env = {**__import__("os").environ, **OFFLINE_ENV}
    proc = subprocess.Popen(
        [*server.command, "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    for _ in range(900):
        if proc.poll() is not None:
            raise SystemExit(f"{server.name} exited; see {log}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{server.ready_path}", timeout=1).is_success:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{server.name} did not start; see {log}")


def _jobs(corpus: Path, n: int, seed: int, peer: bool) -> list[dict]:
    """``n`` request bodies, the same sequence for every server (its own field names)."""
    records = list(read_corpus(corpus))
    rng = np.random.default_rng(seed)
    jobs = []
    for i in range(n):
        r = records[rng.integers(len(records))]
        if i % 10 == 9:
            image = base64.b64encode(Path(r.image).read_bytes()).decode()
            body = {"image": image, "modality": "text"} if peer else {"image": image}
        else:
            text = r.captions[rng.integers(len(r.captions))]
            body = {"text": text, "modality": "image"} if peer else {"text": text}
        if peer:
            body.update(num_images=10, indice_name="bench", deduplicate=False)
        else:
            body["k"] = 10
        jobs.append(body)
    return jobs


class _Connection:
    """One client's keep-alive HTTP/1.1 connection, written by hand: httpx spends ~4 ms of
    CPU a request, which on these 2 cores made the load generator the bottleneck (0.84 of a
    core at 150 requests/s) and put its own scheduling into the latencies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self.streams
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        status = await reader.readline()
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        if "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        else:  # no length: the body runs to the end of the connection
            data = await reader.read()
        if headers.get("connection") == "close" or status.startswith(b"HTTP/1.0") or not data:
            writer.close()
            self.streams = None
        return int(status.split()[1]), data


async def _load(port: int, path: str, jobs: list[dict], clients: int):
    """Seconds per request (in the order sent, text or image: "image" in the job), errors,
    and the wall-clock seconds of the whole load."""
    latencies: list[tuple[bool, float]] = []
    errors: list[str] = []
    queue = [(("image" in job), json.dumps(job).encode()) for job in reversed(jobs)]

    async def worker() -> None:
        connection = _Connection(port)
        while queue:
            image, body = queue.pop()
            t = time.perf_counter()
            try:
                status, data = await connection.post(path, body)
                if status != 200:
                    errors.append(f"{status}: {data[:100]!r}")
            except (OSError, ValueError, asyncio.IncompleteReadError) as e:
                errors.append(repr(e))
                connection = _Connection(port)
            latencies.append((image, time.perf_counter() - t))

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, errors, time.perf_counter() - t


def _batches(url: str) -> dict[int, int]:
    stats = httpx.get(f"{url}/stats", timeout=30).json()
    sizes = stats.get("batching", {}).get("sizes", {})  # none before batching existed
    return {int(k): v for k, v in sizes.items()}


def measure(server: Server, corpus: Path, tmp: Path, args) -> tuple[list[dict], list[list]]:
    """One row per number of clients, all against one server process; and the image paths
    each of `PROBES` text queries finds (its top 10), to compare the servers' answers."""
    port, rows = _port(), []
    proc = _start(server, port, tmp / f"{server.name}.log")
    url, path = f"http://127.0.0.1:{port}", "/knn-service" if server.peer else "/search"
    try:
        for job in _jobs(corpus, 10, 1, server.peer):  # warm-up: both kinds of query
            httpx.post(url + path, json=job, timeout=300)
        probes = [_paths(httpx.post(url + path, json=job, timeout=300).json()) for job in
                  _jobs(corpus, PROBES, 2, server.peer) if "text" in job]  # fmt: skip
        for clients in args.clients:
            n = max(args.min_requests, args.per_client * clients)
            before = {} if server.peer else _batches(url)
            jobs, cpu = _jobs(corpus, n, 0, server.peer), time.process_time()
            lat, errors, wall = asyncio.run(_load(port, path, jobs, clients))
            cpu = time.process_time() - cpu  # the clients' own: they share the 2 cores
            sizes = {} if server.peer else _delta(_batches(url), before)
            ms = np.array([t for _, t in lat]) * 1000
            image_ms = np.array([t for image, t in lat if image]) * 1000
            rows.append({
                "server": server.name, "clients": clients, "requests": n, "errors": len(errors),
                "error_samples": errors[:3], "requests_per_s": round(n / wall, 1),
                "latency_ms": _percentiles(ms), "image_latency_ms": _percentiles(image_ms),
                "client_cpu_share": round(cpu / wall, 2), "batch_sizes": sizes,
                "mean_batch": _mean(sizes),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        for row in rows:  # the server process's peak resident memory over every load
            row["server_peak_rss_mib"] = _peak_rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows, probes


def _paths(answer) -> list[str]:
    """The image paths of an answer, ours (a dict) or clip-retrieval's (a list)."""
    if isinstance(answer, dict):
        return [r["path"] for r in answer["results"]]
    return [r.get("image_path") for r in answer]


def _peak_rss(pid: int) -> float:
    """VmHWM of ``pid`` in MiB (the Flask peer's own process; children not counted)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _percentiles(ms: np.ndarray) -> dict[str, float]:
    return {p: round(float(np.percentile(ms, q)), 1) for p, q in _PCTS.items()} if len(ms) else {}


def _mean(sizes: dict[int, int]) -> float:
    return round(sum(k * v for k, v in sizes.items()) / max(1, sum(sizes.values())), 1)


def _delta(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(out.items()) if v}


def _ours(name: str, root: Path, batched: bool, extra: list[str]) -> Server:
    cmd = [sys.executable, "-m", "retrieval.cli", "serve", "bench", "--index-dir", str(root)]
    cmd += ["--cache-size", "0", "--show-paths", *extra]
    cmd += [] if batched else ["--max-batch", "1"]
    return Server(name, cmd, "/health")


def _before(tree: Path, root: Path) -> Server:
    """`retrieval serve` from another source tree (``--before``: a checkout of an earlier
    commit), same interpreter and packages; flags it lacks are left out."""
    cmd = ["env", f"PYTHONPATH={tree}", sys.executable, "-m", "retrieval.cli", "serve", "bench"]
    cmd += ["--index-dir", str(root), "--show-paths"]
    return Server(f"before ({tree.name})", cmd, "/health")


def _peer(exe: Path, root: Path, ckpt: Path, tmp: Path) -> Server:
    """clip-retrieval back over our export of index ``bench``, indexed by clip-retrieval."""
    export("bench", tmp / "export", ExportConfig(), root)
    subprocess.run(
        [str(exe), "index", "--embeddings_folder", str(tmp / "export"),
         "--index_folder", str(tmp / "cr-index")],
        check=True, capture_output=True,
    )  # fmt: skip
    paths = tmp / "indices.json"
    paths.write_text(json.dumps({"bench": str(tmp / "cr-index")}))
    cmd = [str(exe), "back", "--indices_paths", str(paths), "--clip_model"]
    cmd += [f"open_clip:ViT-B-32/{ckpt}", "--enable_mclip_option", "False"]
    cmd += ["--use_jit", "False", "--provide_aesthetic_embeddings", "False"]
    return Server("clip-retrieval back", cmd, "/indices-list", peer=True)


def run_model(model: str, args, tmp: Path) -> dict:
    corpus = synthetic.generate(tmp / "corpus", n=args.items, seed=0)
    root = tmp / f"indexes-{model}"
    if model == "demo":
        spec, ckpt = ModelSpec("tiny-vit", str(SHIPPED_MODEL)), None
    else:
        torch.manual_seed(0)
        ckpt = tmp / "vit-b-32-random.pt"
        torch.save({"state_dict": open_clip.create_model("ViT-B-32").state_dict()}, ckpt)
        spec = ModelSpec("ViT-B-32", str(ckpt))
    encoder = Encoder.load(spec, device="cpu")
    build(corpus, "bench", BuildConfig(progress=False), root, encoder=encoder)
    del encoder
    extra = args.serve_args.split()
    servers = [_ours("batched", root, True, extra), _ours("one-at-a-time", root, False, extra)]
    if args.before:
        servers.append(_before(args.before, root))
    if model == "vit-b-32" and args.clip_retrieval:
        servers.append(_peer(args.clip_retrieval, root, ckpt, tmp))
    measured = [measure(s, corpus, tmp, args) for s in servers]
    ours = measured[0][1]
    same = [sum(a == b for a, b in zip(ours, p, strict=True)) for _, p in measured]
    return {
        "model": model,
        "rows": [row for rows, _ in measured for row in rows],
        "identical_top10_of_probes": {
            s.name: f"{n}/{len(ours)}" for s, n in zip(servers, same, strict=True)
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,vit-b-32")
    ap.add_argument("--clients", default=",".join(map(str, CLIENTS)))
    ap.add_argument("--per-client", type=int, default=4, help="requests per client")
    ap.add_argument("--min-requests", type=int, default=60)
    ap.add_argument("--items", type=int, default=400, help="demo corpus size")
    ap.add_argument("--clip-retrieval", type=Path, default=None, help="its executable")
    ap.add_argument("--before", type=Path, default=None, help="a source tree to compare with")
    ap.add_argument("--serve-args", default="", help="more `retrieval serve` flags, e.g. tuning")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    torch.set_num_threads(2)
    out = {"machine": describe(), "target_speedup_at_32": TARGET_SPEEDUP, "models": []}
    with tempfile.TemporaryDirectory() as name:
        for model in args.models.split(","):
            out["models"].append(run_model(model, args, Path(name)))
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
