"""Samples/s of `retrieval train` against open_clip's own trainer: same data, model and steps.

    python benchmarks/train_speed.py --steps 240 --repeats 3 --json /tmp/train_speed.json

One run builds a tab-separated CSV in a temporary folder (open_clip's default ``filepath`` /
``title`` columns, absolute paths to coco-mini's real photos, one row per (image, caption)), then
trains the shipped ``tiny-vit`` config from the same random initialisation with

- ``retrieval train CSV`` (the engine: rows grouped into one item per image, an epoch visits each
  image once with one caption drawn, images decoded once into a cache), and
- ``python -m open_clip_train.main --dataset-type csv`` (open_clip's trainer, from the same
  virtual environment: open_clip_torch ships it; the config is registered with
  ``open_clip.add_model_config`` before ``open_clip_train.main.main`` is called),

with the same batch size, number of optimizer steps, learning rate, warm-up, cosine schedule,
weight decay, AdamW betas and epsilon, number of data-loading workers
(``retrieval.model.encoder.default_workers()``), fp32 on the CPU, seed 0 and no evaluation while
timing. Both write the same number of checkpoints: open_clip one at the end of each of its epochs
(its default), the engine one every as many of its (shorter: one caption per image) epochs as
make the same number of steps (``--save-every``). Each trainer runs as its own process; a
global optimizer-step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) stamps
the wall-clock time of every optimizer step, so that for both trainers the script reports

- end to end: ``steps x batch / (process exit - process launch)``: start-up, imports, model
  creation, data reading (and the engine's decode-once), training, checkpoints, exit;
- steady state: ``(steps - 1) x batch / (last step - first step)``: data loading, steps and
  per-epoch checkpoints, no start-up and no final save;
- the median within-epoch step interval (pure step + data time) and the total time spent at
  epoch boundaries beyond it (checkpoint writing, data-loader restarts).

The two are then scored with the same code (``retrieval.model.encoder.Encoder`` +
``retrieval.scoring.metrics.retrieval_metrics``): Recall@1/5/10 both ways on the training photos
(the 159 val2017 ones by default) and on the held-out ones (the 80 train2017 ones), plus the
untrained initialisation as a floor. Repeats alternate which trainer goes first; the table shows
medians.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from machine import busy_seconds, describe

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco-mini"
CONFIG = REPO / "retrieval" / "model" / "configs" / "tiny-vit.json"
MODEL = CONFIG.stem
CHILD = "--child"


@dataclass(frozen=True)
class Hyper:
    batch: int = 64
    lr: float = 5e-4
    warmup: int = 50
    wd: float = 0.1
    beta1: float = 0.9  # torch's AdamW defaults, which `retrieval train` uses; open_clip's
    beta2: float = 0.999  # trainer would pick 0.98 / 1e-6 for a "vit" name unless told
    eps: float = 1e-8
    seed: int = 0


@dataclass(frozen=True)
class Item:
    image: Path
    captions: tuple[str, ...]


@dataclass
class Run:
    trainer: str
    steps: int
    steps_per_epoch: int
    seconds: float  # process launch to exit
    startup_s: float  # launch to the first optimizer step
    steady_s: float  # first to last optimizer step
    tail_s: float  # last optimizer step to exit
    step_median_s: float  # median interval between two steps of the same epoch
    boundary_extra_s: float  # time at epoch boundaries beyond a median step
    end_to_end_sps: float
    steady_sps: float
    step_sps: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    other_cpu_cores: float  # CPU busy outside this trainer's processes during the run, in cores
    steal_cores: float  # CPU time the hypervisor took from this VM during the run, in cores
    checkpoint: str
    checkpoint_bytes_on_disk: int


# ----------------------------------------------------------------------------- child process


def _child(kind: str, stamps: Path, argv: list[str]) -> None:
    """Run one trainer in this process, stamping every optimizer step; dump stamps at exit."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    times: list[float] = []
    pid = os.getpid()
    register_optimizer_step_post_hook(lambda *_: times.append(time.time()))

    def dump() -> None:
        if os.getpid() == pid:  # not in forked data-loader workers
            stamps.write_text(json.dumps(times))

    atexit.register(dump)
    if kind == "open_clip":
        import open_clip
        from open_clip_train.main import main as open_clip_main

        open_clip.add_model_config(CONFIG)
        code = open_clip_main(argv)
        if code not in (None, 0):
            raise SystemExit(code)
    else:
        from retrieval.cli import main as cli

        cli(argv, prog_name="retrieval")


# ----------------------------------------------------------------------------- data


def load_items(root: Path) -> tuple[dict[str, list[Item]], int]:
    """coco-mini's photos by split ("val2017", "train2017") and the total number of photos."""
    records = json.loads((root / "captions.json").read_text(encoding="utf-8"))
    by_split: dict[str, list[Item]] = {}
    for r in records:
        captions = tuple(" ".join(c.split()) for c in r["captions"])  # one caption has a tab
        by_split.setdefault(r["split"], []).append(Item(root / "images" / r["image"], captions))
    return by_split, len(records)


def write_csv(items: list[Item], path: Path) -> int:
    """open_clip's CSV layout: tab-separated ``filepath``/``title``, one row per pair."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["filepath", "title"])
        for item in items:
            w.writerows([str(item.image.resolve()), c] for c in item.captions)
    return sum(len(i.captions) for i in items)


# ----------------------------------------------------------------------------- trainers


def _shared_flags(h: Hyper, workers: int) -> list[str]:
    """The flags both trainers spell the same way."""
    values = {"batch-size": h.batch, "lr": h.lr, "warmup": h.warmup, "wd": h.wd, "seed": h.seed}
    return [*(x for k, v in values.items() for x in (f"--{k}", str(v))), "--workers", str(workers)]


def engine_args(
    csv_path: Path, out: Path, steps: int, workers: int, h: Hyper, save_every: int
) -> list[str]:
    return [
        "train",
        str(csv_path),
        "--out",
        str(out),
        "--model",
        MODEL,
        "--steps",
        str(steps),
        *_shared_flags(h, workers),
        "--save-every",
        str(save_every),
        "--no-progress",
    ]


def open_clip_args(csv_path: Path, logs: Path, epochs: int, workers: int, h: Hyper) -> list[str]:
    return [
        "--train-data",
        str(csv_path),
        "--dataset-type",
        "csv",
        "--csv-separator",
        "\t",
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--model",
        MODEL,
        "--epochs",
        str(epochs),
        *_shared_flags(h, workers),
        "--beta1",
        str(h.beta1),
        "--beta2",
        str(h.beta2),
        "--eps",
        str(h.eps),
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--logs",
        str(logs),
        "--name",
        "oc",
        "--save-frequency",
        "1",
        "--zeroshot-frequency",
        "0",
        "--val-frequency",
        "0",
        "--report-to",
        "",
        "--log-every-n-steps",
        "100",
    ]


def _cpu_seconds() -> tuple[float, float, float]:
    """(machine busy s, hypervisor steal s, this process's waited-for children's CPU s)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (*busy_seconds(), children.ru_utime + children.ru_stime)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.pt") if p.is_file())


def run_trainer(
    kind: str, argv: list[str], work: Path, steps_per_epoch: int, checkpoint_dir: Path
) -> Run:
    stamps = work / f"{kind}-stamps.json"
    log = work / f"{kind}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), CHILD, kind, str(stamps), *argv]
    load_before = os.getloadavg()
    busy0, steal0, own0 = _cpu_seconds()
    start = time.time()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    end = time.time()
    busy1, steal1, own1 = _cpu_seconds()
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{kind} trainer failed ({done.returncode}):\n{tail}")
    t = json.loads(stamps.read_text())
    gaps = [b - a for a, b in itertools.pairwise(t)]
    # gap k lies between step k and step k+1 (1-based): an epoch boundary when k % spe == 0
    inner = [g for k, g in enumerate(gaps, 1) if k % steps_per_epoch]
    boundary = [g for k, g in enumerate(gaps, 1) if not k % steps_per_epoch]
    median = statistics.median(inner) if inner else statistics.median(gaps)
    if kind == "engine":
        ckpt = checkpoint_dir / "latest.pt"
    else:
        ckpt = max(checkpoint_dir.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    batch = Hyper().batch
    return Run(
        trainer=kind,
        steps=len(t),
        steps_per_epoch=steps_per_epoch,
        seconds=end - start,
        startup_s=t[0] - start,
        steady_s=t[-1] - t[0],
        tail_s=end - t[-1],
        step_median_s=median,
        boundary_extra_s=sum(g - median for g in boundary),
        end_to_end_sps=len(t) * batch / (end - start),
        steady_sps=(len(t) - 1) * batch / (t[-1] - t[0]),
        step_sps=batch / median,
        load_before=load_before,
        load_after=os.getloadavg(),
        other_cpu_cores=max(0.0, (busy1 - busy0) - (own1 - own0)) / (end - start),
        steal_cores=(steal1 - steal0) / (end - start),
        checkpoint=str(ckpt),
        checkpoint_bytes_on_disk=_dir_bytes(checkpoint_dir),
    )


# ----------------------------------------------------------------------------- recall


def recall(checkpoint: Path | None, splits: dict[str, list[Item]]) -> dict[str, dict[str, float]]:
    """Recall@1/5/10 both ways of one checkpoint (None: the untrained init) on each split."""
    import numpy as np

    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import ModelSpec
    from retrieval.scoring.metrics import retrieval_metrics

    weights = str(checkpoint) if checkpoint else None
    encoder = Encoder.load(ModelSpec(MODEL, weights, random_init=weights is None), "cpu")
    out = {}
    for name, items in splits.items():
        images, positions, failures = encoder.encode_image_files([i.image for i in items])
        if failures or len(positions) != len(items):
            raise SystemExit(f"could not decode {failures}")
        texts = [c for i in items for c in i.captions]
        owner = np.array([k for k, i in enumerate(items) for _ in i.captions])
        m = retrieval_metrics(images, encoder.encode_texts(texts), owner)
        out[name] = {k: round(v, 4) for k, v in m.items() if "recall@" in k}
    return out


# ----------------------------------------------------------------------------- report


def _median(runs: list[Run], key: str) -> float:
    return statistics.median(getattr(r, key) for r in runs)


def _mean_recall(r: dict[str, float]) -> float:
    return sum(r.values()) / len(r)


def table(runs: dict[str, list[Run]], recalls: dict[str, list[dict]], splits: list[str]) -> str:
    names = {"engine": "retrieval train", "open_clip": "open_clip_train", "init": "untrained"}
    rows = [
        "| trainer | end-to-end samples/s | steady samples/s | step-only samples/s | wall s "
        "| start-up s | epoch-boundary s | final save + exit s | other CPU load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("engine", "open_clip"):
        rs = runs[kind]
        rows.append(
            f"| {names[kind]} | {_median(rs, 'end_to_end_sps'):.0f} "
            f"| {_median(rs, 'steady_sps'):.0f} | {_median(rs, 'step_sps'):.0f} "
            f"| {_median(rs, 'seconds'):.1f} | {_median(rs, 'startup_s'):.1f} "
            f"| {_median(rs, 'boundary_extra_s'):.1f} | {_median(rs, 'tail_s'):.1f} "
            f"| {_median(rs, 'other_cpu_cores'):.2f} cores |"
        )
    e, o = runs["engine"], runs["open_clip"]
    ratios = [_median(e, k) / _median(o, k) for k in ("end_to_end_sps", "steady_sps", "step_sps")]
    rows.append(
        f"| **ratio ours / open_clip** | **{ratios[0]:.2f}x** | {ratios[1]:.2f}x "
        f"| {ratios[2]:.2f}x | | | | | |"
    )
    rows += ["", "Recall (median over repeats; T2I = text->image, I2T = image->text):", ""]
    head = "| model | " + " | ".join(
        f"{s} {d}@{k}" for s in splits for d in ("T2I", "I2T") for k in (1, 5, 10)
    )
    rows += [head + " |", "|---" + "|---:" * (6 * len(splits)) + "|"]
    for kind in ("engine", "open_clip", "init"):
        cells = []
        for s in splits:
            for d in ("image_retrieval", "text_retrieval"):
                for k in (1, 5, 10):
                    key = f"{d}_recall@{k}"
                    cells.append(f"{statistics.median(r[s][key] for r in recalls[kind]):.3f}")
        rows.append(f"| {names[kind]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- main


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=COCO_MINI, help="coco-mini folder.")
    ap.add_argument(
        "--steps",
        type=int,
        default=240,
        help="Optimizer steps (rounded up to whole open_clip epochs).",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--train-split",
        default="val2017",
        help="Train on this split and hold out the rest, or 'all' (training-set recall only).",
    )
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    return ap.parse_args()


def run_all(
    repeats: int,
    splits: dict[str, list[Item]],
    steps: int,
    open_clip_epochs: tuple[int, int],
    save_every: int,
    h: Hyper,
) -> tuple[dict[str, list[Run]], dict[str, list[dict]]]:
    """Both trainers ``repeats`` times, alternating which goes first; their runs and recalls."""
    from retrieval.model.encoder import default_workers

    workers = default_workers()
    epochs, oc_per_epoch = open_clip_epochs
    engine_per_epoch = len(splits["train"]) // h.batch
    train_items = splits["train"]
    runs: dict[str, list[Run]] = {"engine": [], "open_clip": []}
    recalls: dict[str, list[dict]] = {"engine": [], "open_clip": [], "init": []}
    with tempfile.TemporaryDirectory(prefix="train-speed-") as name:
        tmp = Path(name)
        csv_path = tmp / "train.csv"
        write_csv(train_items, csv_path)
        recalls["init"].append(recall(None, splits))
        for rep in range(repeats):
            order = ["engine", "open_clip"] if rep % 2 == 0 else ["open_clip", "engine"]
            for kind in order:
                work = tmp / f"rep{rep}"
                work.mkdir(exist_ok=True)
                if kind == "engine":
                    out = work / "engine"
                    argv = engine_args(csv_path, out, steps, workers, h, save_every)
                    run = run_trainer(kind, argv, work, engine_per_epoch, out / "checkpoints")
                else:
                    logs = work / "open_clip"
                    argv = open_clip_args(csv_path, logs, epochs, workers, h)
                    run = run_trainer(kind, argv, work, oc_per_epoch, logs / "oc" / "checkpoints")
                if run.steps != steps:
                    raise SystemExit(f"{kind} made {run.steps} optimizer steps, not {steps}")
                recalls[kind].append(recall(Path(run.checkpoint), splits))
                runs[kind].append(run)
                print(
                    f"repeat {rep + 1} {kind}: {run.seconds:.1f} s, "
                    f"{run.end_to_end_sps:.0f} samples/s end to end, "
                    f"{run.steady_sps:.0f} steady; load average {run.load_before[0]:.2f} -> "
                    f"{run.load_after[0]:.2f}, other processes {run.other_cpu_cores:.2f} cores, "
                    f"steal {run.steal_cores:.2f}; recall {recalls[kind][-1]}",
                    flush=True,
                )
                # free the disk between runs (the engine keeps every epoch's checkpoint)
                for p in work.rglob("*.pt"):
                    p.unlink()
    return runs, recalls


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == CHILD:
        _child(sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
        return
    args = parse()
    from retrieval.model.encoder import default_workers

    h = Hyper()
    workers = default_workers()
    by_split, n_photos = load_items(args.data)
    if args.train_split == "all":
        splits = {"train": [i for items in by_split.values() for i in items]}
    else:
        held = [i for s, items in by_split.items() if s != args.train_split for i in items]
        splits = {"train": by_split[args.train_split], "heldout": held}
    train_items = splits["train"]
    pairs = sum(len(i.captions) for i in train_items)
    oc_per_epoch = pairs // h.batch  # open_clip: rows, last partial batch dropped
    engine_per_epoch = len(train_items) // h.batch  # engine: images, last partial batch dropped
    epochs = -(-args.steps // oc_per_epoch)
    steps = epochs * oc_per_epoch
    # One checkpoint per open_clip epoch's worth of steps for both trainers.
    save_every = max(1, oc_per_epoch // max(1, engine_per_epoch))
    info = describe()
    print(
        f"{len(train_items)} training photos ({pairs} pairs) of {n_photos}; batch {h.batch}; "
        f"{steps} steps = {epochs} open_clip epochs of {oc_per_epoch} = "
        f"{-(-steps // engine_per_epoch)} engine epochs of {engine_per_epoch}; "
        f"{workers} loader worker(s); {info}",
        flush=True,
    )
    runs, recalls = run_all(args.repeats, splits, steps, (epochs, oc_per_epoch), save_every, h)
    print()
    print(table(runs, recalls, list(splits)))
    if args.json:
        report = {
            "machine": info,
            "hyper": asdict(h),
            "workers": workers,
            "train_photos": len(train_items),
            "train_pairs": pairs,
            "steps": steps,
            "runs": {k: [asdict(r) for r in v] for k, v in runs.items()},
            "recall": recalls,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
