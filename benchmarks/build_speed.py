"""Images/s of `retrieval build`, against the model's own speed and clip-retrieval's inference.

From the repository root (see benchmarks/README.md, "Build speed", for the clip-retrieval venv):

    .venv/bin/python benchmarks/build_speed.py --clip-retrieval /tmp/cr-venv/bin/clip-retrieval

One run, the same images and the same model for every row:

- images: coco-mini's 239 real JPEGs (``../shared/data/coco-mini/images``), symlinked into a
  temporary folder under new names, repeated until there are at least 500 (717 by default);
- model: open_clip ViT-B-32 with random weights (seed 0) saved as a local checkpoint in the
  temporary folder (no download); the script checks that open_clip loads it back unchanged;
- batch size 64 and ``retrieval.model.encoder.default_workers()`` decoding processes everywhere.

Rows (images/s = images / wall-clock seconds of what the row includes):

1. plain open_clip loop: torch DataLoader (PIL open + the model's preprocess) ->
   ``model.encode_image`` under ``torch.inference_mode()`` -> L2-normalise. Model loaded and
   warmed up (one forward pass on a zero batch) before timing; the load time is reported apart.
2. decoding alone: the same DataLoader with no model, what the workers can feed at most.
3. engine encode phase, per runtime (torch fp32, onnx fp32, onnx int8): ``Encoder.load(...)``
   then ``encode_image_files(paths, batch_size=64)`` (our safe decoding, failure bookkeeping,
   float32 contract). Same warm-up; load (and the first ONNX export) apart.
4. ``retrieval build`` end to end, per runtime, a subprocess: interpreter start-up, imports,
   model load (ONNX graphs from the cache the encode rows filled), reading the folder,
   decoding, encoding (images; a plain folder has no captions), FAISS, querybank normalisers,
   LMDB, manifest (with the checkpoint's SHA-256) and publish.
5. ``clip-retrieval inference`` end to end, a subprocess from its own virtualenv, image-only
   (its folder reader needs ``--enable_text False``): start-up, imports, model load, its own
   warm-up, decoding, encoding, writing .npy + parquet.

Each row runs ``--repeats`` times, the repeats interleaved (row 1..4, then 1..4 again) so that
a slow spell of the machine hits every row alike; the table gives the best (highest) images/s
and every run. For each run it also gives the CPU time that other processes used meanwhile
(machine busy time from /proc/stat minus this process tree's own): non-zero means the figures
were disturbed by something else on the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from machine import background_cores, busy_seconds, describe
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from retrieval.index.manifest import read_manifest
from retrieval.model.encoder import Encoder, default_workers
from retrieval.model.onnx.cache import ENV_CACHE
from retrieval.model.runtime import ALL_RUNTIMES, Runtime
from retrieval.model.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini" / "images"
MODEL = "ViT-B-32"
BATCH = 64
MIN_IMAGES = 500
SEED = 0
ENCODE_TARGET = 2.5  # engine encode phase, onnx int8 / plain loop, images/s
BUILD_TARGET = 2.0  # retrieval build, onnx int8 / clip-retrieval inference, images/s
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


@dataclass(frozen=True)
class Setup:
    folder: Path
    paths: list[Path]  # sorted: the order clip-retrieval writes its embeddings in
    ckpt: Path
    workers: int
    tmp: Path


@dataclass
class Run:
    seconds: float
    other_cpu: float  # core-seconds used by processes outside this tree during the run
    detail: dict[str, float | int | str] = field(default_factory=dict)


@dataclass
class Row:
    name: str
    includes: str
    images: int
    runs: list[Run] = field(default_factory=list)
    skipped: str | None = None

    def rates(self) -> list[float]:
        return [self.images / r.seconds for r in self.runs]

    @property
    def best(self) -> float:
        return max(self.rates()) if self.runs else math.nan

    def as_json(self) -> dict:
        runs = [
            {"seconds": round(x.seconds, 2), "other_cpu": round(x.other_cpu, 2), **x.detail}
            for x in self.runs
        ]
        best = round(self.best, 3)
        return {
            "includes": self.includes,
            "best_images_per_s": best,
            "runs": runs,
            "skipped": self.skipped,
        }


# --- measuring -----------------------------------------------------------------------------


def _own_cpu() -> float:
    """CPU seconds of this process and its reaped descendants (DataLoader workers, subprocesses)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], dict[str, float | int | str]]) -> Run:
    """Run ``fn`` once; wall seconds, other processes' CPU meanwhile, and what ``fn`` returns."""
    busy0, own0 = sum(busy_seconds()), _own_cpu()
    start = time.perf_counter()
    detail = fn()
    seconds = time.perf_counter() - start
    other = sum(busy_seconds()) - busy0 - (_own_cpu() - own0)
    return Run(seconds, max(0.0, other), detail)


# --- inputs --------------------------------------------------------------------------------


def make_folder(tmp: Path, source: Path, copies: int | None) -> Path:
    """Symlink every JPEG of ``source`` into ``tmp/images`` under new names, enough times."""
    photos = sorted(source.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"no .jpg files in {source}")
    copies = copies or math.ceil(MIN_IMAGES / len(photos))
    if copies * len(photos) < MIN_IMAGES:
        raise SystemExit(f"{copies} x {len(photos)} images < {MIN_IMAGES}: raise --copies")
    folder = tmp / "images"
    folder.mkdir()
    for c in range(copies):
        for src in photos:
            (folder / f"c{c}_{src.name}").symlink_to(src.resolve())
    return folder


def make_checkpoint(tmp: Path) -> Path:
    """A randomly initialised ViT-B-32 saved the way open_clip loads local checkpoints."""
    torch.manual_seed(SEED)
    model = open_clip.create_model(MODEL)
    ckpt = tmp / "vit-b-32-random.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return ckpt


def check_checkpoint(model: torch.nn.Module, ckpt: Path) -> None:
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    loaded = model.state_dict()
    same = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    if not same:
        raise SystemExit(f"open_clip did not load {ckpt} unchanged")


# --- rows ----------------------------------------------------------------------------------


class _Files(Dataset):
    def __init__(self, paths: list[Path], preprocess: Callable) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(Image.open(self.paths[i]))


class PlainLoop:
    """open_clip as its README uses it, batched with a DataLoader: the model's own speed."""

    def __init__(self, ckpt: Path) -> None:
        start = time.perf_counter()
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            MODEL, pretrained=str(ckpt)
        )
        self.model.eval()
        self.load_seconds = time.perf_counter() - start
        check_checkpoint(self.model, ckpt)
        self.embeddings = np.zeros((0, 0), np.float32)
        warm_up(self.model, self.preprocess)

    def __call__(self, setup: Setup) -> dict[str, float | int | str]:
        loader = DataLoader(
            _Files(setup.paths, self.preprocess), batch_size=BATCH, num_workers=setup.workers
        )
        chunks = []
        with torch.inference_mode():
            for pixels in loader:
                chunks.append(F.normalize(self.model.encode_image(pixels), dim=-1).numpy())
        self.embeddings = np.concatenate(chunks)
        return {}


class DecodeOnly:
    """The DataLoader of the plain loop without a model: what decoding can feed at most."""

    def __init__(self, preprocess: Callable) -> None:
        self.preprocess = preprocess

    def __call__(self, setup: Setup) -> dict[str, float | int | str]:
        loader = DataLoader(
            _Files(setup.paths, self.preprocess), batch_size=BATCH, num_workers=setup.workers
        )
        for _ in loader:
            pass
        return {}


class EngineEncode:
    """The encode phase of `retrieval build`, through the library's Python API."""

    def __init__(self, ckpt: Path, runtime: Runtime) -> None:
        start = time.perf_counter()
        self.encoder = Encoder.load(ModelSpec(MODEL, str(ckpt)), "cpu", runtime)
        self.load_seconds = time.perf_counter() - start  # an ONNX runtime's first export too
        self.embeddings = np.zeros((0, 0), np.float32)
        self.encoder.encode_pil([Image.new("RGB", (256, 256))] * BATCH)  # warm-up

    def __call__(self, setup: Setup) -> dict[str, float | int | str]:
        emb, positions, failures = self.encoder.encode_image_files(setup.paths, batch_size=BATCH)
        if failures or len(emb) != len(setup.paths):
            raise SystemExit(f"engine encode failed on {len(failures)} images: {failures}")
        self.embeddings = emb[np.argsort(positions)]
        return {}


def warm_up(model: torch.nn.Module, preprocess: Callable) -> None:
    """One untimed forward pass on a zero batch of the model's input size."""
    x = preprocess(Image.new("RGB", (256, 256))).unsqueeze(0).expand(BATCH, -1, -1, -1)
    with torch.inference_mode():
        model.encode_image(x.contiguous())


def retrieval_build(setup: Setup, rep: int, runtime: Runtime) -> dict[str, float | int | str]:
    index_dir = setup.tmp / f"indexes-{rep}"
    exe = Path(sys.executable).parent / "retrieval"
    cmd = [
        str(exe),
        "build",
        str(setup.folder),
        "--name",
        "bench",
        "--model",
        MODEL,
        "--pretrained",
        str(setup.ckpt),
        "--index-dir",
        str(index_dir),
        "--no-progress",
        "--runtime",
        runtime.engine,
        "--precision",
        runtime.precision,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
    if done.returncode:
        raise SystemExit(f"retrieval build failed ({done.returncode}):\n{done.stderr}")
    manifest = read_manifest(index_dir / "bench")
    shutil.rmtree(index_dir)
    if manifest.counts.items != len(setup.paths):
        raise SystemExit(f"retrieval build indexed {manifest.counts.items} of {len(setup.paths)}")
    return {"build_seconds_in_manifest": manifest.build_seconds}


def clip_retrieval(
    exe: Path, setup: Setup, rep: int, reference: np.ndarray
) -> dict[str, float | int | str]:
    out = setup.tmp / f"clip-retrieval-{rep}"
    cmd = [
        str(exe),
        "inference",
        "--input_dataset",
        str(setup.folder),
        "--output_folder",
        str(out),
        "--input_format",
        "files",
        "--enable_text",
        "False",
        "--enable_metadata",
        "False",
        "--clip_model",
        f"open_clip:{MODEL}/{setup.ckpt}",  # "open_clip:NAME//abs/path.pt"
        "--batch_size",
        str(BATCH),
        "--num_prepro_workers",
        str(setup.workers),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
    if done.returncode:
        raise SystemExit(f"clip-retrieval failed ({done.returncode}):\n{done.stderr[-4000:]}")
    emb = np.concatenate([np.load(p) for p in sorted((out / "img_emb").glob("*.npy"))])
    if len(emb) != len(setup.paths):
        raise SystemExit(f"clip-retrieval wrote {len(emb)} of {len(setup.paths)} embeddings")
    stats = json.loads((out / "stats" / "0.json").read_text())
    shutil.rmtree(out)
    return {
        "model_seconds_in_its_stats": round(stats["inference_duration"], 2),
        "min_cosine_vs_plain": round(min_cosine(emb.astype(np.float32), reference), 4),
    }


def _env() -> dict[str, str]:
    """The subprocesses' environment: CPU only, and no hub or telemetry look-ups."""
    return {**os.environ, **OFFLINE_ENV, "CUDA_VISIBLE_DEVICES": ""}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


# --- report --------------------------------------------------------------------------------


def print_table(rows: list[Row], plain: float) -> None:
    head = f"{'row':<38} {'images':>6} {'best s':>7} {'img/s':>6} {'x plain':>7}  runs img/s"
    print(head)
    print("-" * len(head))
    for row in rows:
        if row.skipped:
            print(f"{row.name:<38} skipped: {row.skipped}")
            continue
        runs = ", ".join(f"{r:.2f}" for r in row.rates())
        best_s = min(r.seconds for r in row.runs)
        print(
            f"{row.name:<38} {row.images:>6} {best_s:>7.1f} {row.best:>6.2f} "
            f"{row.best / plain:>7.2f}  {runs}"
        )
    print()
    for row in rows:
        if not row.skipped:
            print(f"{row.name}: {row.includes}")
            for i, run in enumerate(row.runs):
                extra = "".join(f", {k} {v}" for k, v in run.detail.items())
                print(
                    f"  run {i + 1}: {run.seconds:.1f}s, other processes' CPU meanwhile "
                    f"{run.other_cpu:.1f} core-s{extra}"
                )


def verdict(name: str, ratio: float, target: float) -> str:
    if math.isnan(ratio):
        return f"{name}: not measured"
    met = "MET" if ratio >= target else f"MISSED by {(target - ratio) / target:.0%}"
    return f"{name}: {ratio:.2f}x (target >= {target}x) {met}"


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=COCO_MINI, help="folder of source JPEGs")
    ap.add_argument(
        "--copies", type=int, default=None, help="links per photo [enough for 500 images]"
    )
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per row (>= 2)")
    ap.add_argument(
        "--clip-retrieval", type=Path, default=None, help="the clip-retrieval executable"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.repeats < 2:
        ap.error("--repeats must be at least 2")
    return args


def main() -> None:
    args = parse()
    info = describe()
    print(json.dumps(info))
    idle = background_cores()
    print(f"other processes before the run: {idle:.2f} cores busy")
    if idle > 0.1:
        print("WARNING: the machine is not idle; the figures below will be disturbed")

    with tempfile.TemporaryDirectory(prefix="build-speed-") as name:
        tmp = Path(name)
        os.environ[ENV_CACHE] = str(tmp / "cache")  # ONNX graphs: exported here, once
        folder = make_folder(tmp, args.images, args.copies)
        paths = sorted(folder.glob("*.jpg"))
        setup = Setup(folder, paths, make_checkpoint(tmp), default_workers(), tmp)
        n = len(setup.paths)
        print(f"{n} images in {folder}, checkpoint {setup.ckpt}, workers {setup.workers}")

        plain = PlainLoop(setup.ckpt)
        engines = {rt: EngineEncode(setup.ckpt, rt) for rt in ALL_RUNTIMES}
        rows = measure(setup, plain, engines, args.clip_retrieval, args.repeats)

    print()
    print(f"images/s = {n} images / wall-clock seconds; best of {args.repeats} runs")
    loads = {str(rt): round(e.load_seconds, 1) for rt, e in engines.items()}
    print(f"model load, excluded from the encode rows: plain {plain.load_seconds:.1f}s, {loads}")
    print()
    print_table(rows, rows[0].best)
    by_name = {r.name: r for r in rows}
    fast = f"engine encode phase ({INT8})"
    encode_ratio = by_name[fast].best / rows[0].best
    peer = by_name[CLIP_RETRIEVAL]
    build_ratio = by_name[f"retrieval build ({INT8})"].best / peer.best if peer.runs else math.nan
    print()
    print(verdict(f"{fast} / plain loop", encode_ratio, ENCODE_TARGET))
    print(
        verdict(f"retrieval build ({INT8}) / clip-retrieval inference", build_ratio, BUILD_TARGET)
    )
    if args.json:
        report = {
            "machine": info,
            "background_cores_before": round(idle, 2),
            "images": n,
            "model": MODEL,
            "batch_size": BATCH,
            "workers": setup.workers,
            "model_load_seconds": {"plain": round(plain.load_seconds, 2), **loads},
            "rows": {r.name: r.as_json() for r in rows},
            "encode_int8_vs_plain": round(encode_ratio, 3),
            "build_int8_vs_clip_retrieval": None
            if math.isnan(build_ratio)
            else round(build_ratio, 3),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


INT8 = "onnx int8"
CLIP_RETRIEVAL = "clip-retrieval inference (subprocess)"


def measure(
    setup: Setup, plain: PlainLoop, engines: dict, exe: Path | None, repeats: int
) -> list[Row]:
    """Every row, their repeats interleaved so that a slow spell hits every row alike."""
    n, decode = len(setup.paths), DecodeOnly(plain.preprocess)
    jobs: list[tuple[Row, Callable]] = [
        (
            Row("plain open_clip loop", "DataLoader decode + preprocess + encode_image", n),
            lambda s, rep: plain(s),
        ),
        (
            Row("decoding alone", "the same DataLoader, no model", n),
            lambda s, rep: decode(s),
        ),
    ]
    for rt, engine in engines.items():
        row = Row(f"engine encode phase ({rt})", "Encoder.encode_image_files", n)
        jobs.append((row, _checked(engine, plain)))
    for rt in engines:
        row = Row(f"retrieval build ({rt})", "whole command, start to exit", n)
        jobs.append((row, lambda s, rep, rt=rt: retrieval_build(s, rep, rt)))
    peer = Row(CLIP_RETRIEVAL, "whole command, start to exit", n)
    if exe is None or not exe.is_file():
        peer.skipped = "no --clip-retrieval given" if exe is None else f"{exe} not found"
        print(f"clip-retrieval row skipped: {peer.skipped}")
    else:
        jobs.append((peer, lambda s, rep: clip_retrieval(exe, s, rep, plain.embeddings)))
    for rep in range(repeats):
        for row, job in jobs:
            row.runs.append(timed(lambda job=job, rep=rep: job(setup, rep)))
        print(f"repeat {rep + 1}/{repeats} done", flush=True)
    return [row for row, _ in jobs] + ([peer] if peer.skipped else [])


def _checked(engine: EngineEncode, plain: PlainLoop) -> Callable:
    def run(setup: Setup, rep: int) -> dict[str, float | int | str]:
        engine(setup)
        return {"min_cosine_vs_plain": round(min_cosine(engine.embeddings, plain.embeddings), 4)}

    return run


if __name__ == "__main__":
    main()
