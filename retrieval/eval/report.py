"""A benchmark's outputs: the table on stdout, CLIP_benchmark's JSON, Markdown, Recall@K plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .bench import DIRECTIONS, BenchResult


def table(result: BenchResult) -> str:
    """A readable table: one row per strategy, Recall@K in both directions, loss vs exact."""
    keys = [k for k in result.rows[0].metrics if "recall@" in k]
    cosines = any(_COSINES[0] in r.metrics for r in result.rows)  # `--runtime-rows`
    head = ["strategy"] + [_short(k) for k in keys]
    head += ["image cos mean / min", "text cos mean / min"] if cosines else []
    lines = [" | ".join(head)]
    base = result.rows[0].metrics
    for row in result.rows:
        cells = [row.strategy]
        for k in keys:
            v = row.metrics.get(k)
            delta = "" if v is None or row is result.rows[0] else f" ({100 * (v - base[k]):+.1f})"
            cells.append("-" if v is None else f"{100 * v:.1f}{delta}")
        if cosines:
            cells += [_pair(row.metrics, kind) for kind in ("image", "text")]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


_COSINES = ("image_cosine_mean", "image_cosine_min")


def _pair(m: dict[str, float], kind: str) -> str:
    mean, low = m.get(f"{kind}_cosine_mean"), m.get(f"{kind}_cosine_min")
    return "-" if mean is None else f"{mean:.4f} / {low:.4f}"


def _short(key: str) -> str:
    direction, k = key.split("_recall@")
    return f"{DIRECTIONS[direction]} R@{k}"


def to_json(result: BenchResult) -> dict:
    """CLIP_benchmark's result layout (``metrics`` flat, exact search), plus every strategy."""
    exact = result.rows[0].metrics
    return {
        "dataset": result.dataset,
        "task": "zeroshot_retrieval",
        "language": "en",
        "model": result.model.name,
        "pretrained": result.model.pretrained,
        "runtime": result.runtime.to_json(),
        "metrics": exact,
        "counts": {"images": result.images, "captions": result.captions, "skipped": result.skipped},
        "strategies": {r.strategy: r.metrics for r in result.rows},
    }


def to_markdown(result: BenchResult) -> str:
    lines = table(result).splitlines()
    sep = "|" + "|".join("---" for _ in lines[0].split(" | ")) + "|"
    body = [f"| {ln} |" for ln in lines]
    return "\n".join([body[0], sep, *body[1:]]) + "\n"


def plot(result: BenchResult, path: Path) -> Path:
    """Recall@K curves, one panel per direction, one line per strategy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (key, label) in zip(axes, DIRECTIONS.items(), strict=True):
        for row in result.rows:
            if key in row.curves:
                curve = row.curves[key]
                ax.plot(np.arange(1, len(curve) + 1), 100 * curve, marker=".", label=row.strategy)
        ax.set(title=label, xlabel="K", xscale="log", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Recall@K (%)")
    axes[0].legend(loc="lower right", fontsize=8)  # the left panel has every strategy
    fig.suptitle(f"{Path(result.dataset).name} - {result.model.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: BenchResult, json_path=None, markdown_path=None, plot_path=None):
    if json_path:
        Path(json_path).write_text(json.dumps(to_json(result), indent=2) + "\n")
    if markdown_path:
        Path(markdown_path).write_text(to_markdown(result))
    if plot_path:
        plot(result, Path(plot_path))
