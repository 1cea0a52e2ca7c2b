"""Shared fixtures: one tiny model per session, small corpora written to temporary folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.corpus import synthetic
from retrieval.model.encoder import Encoder
from retrieval.model.onnx.cache import ENV_CACHE
from retrieval.model.spec import ModelSpec


@pytest.fixture(scope="session", autouse=True)
def _cache_in_tmp(tmp_path_factory):
    """Exported ONNX graphs go to a temporary folder, for this process and the commands it
    starts, never to the user's cache."""
    saved = os.environ.get(ENV_CACHE)
    os.environ[ENV_CACHE] = str(tmp_path_factory.mktemp("cache"))
    yield
    if saved is None:
        os.environ.pop(ENV_CACHE, None)
    else:
        os.environ[ENV_CACHE] = saved


@pytest.fixture(scope="session")
def encoder() -> Encoder:
    return Encoder.load(ModelSpec("tiny-vit", random_init=True), device="cpu")


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """A 40-image synthetic corpus (corpus.jsonl + images/)."""
    return synthetic.generate(tmp_path_factory.mktemp("synth"), n=40, seed=3)


def write_image(path: Path, size=(32, 24), colour=(200, 30, 30), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


MICRO = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def micro_config(tmp_path_factory) -> Path:
    """A one-layer open_clip architecture, as a config JSON: fast enough to train in tests."""
    path = tmp_path_factory.mktemp("cfg") / "micro-vit.json"
    path.write_text(json.dumps(MICRO))
    return path


def wait_until_serving(proc, url: str, log: Path, deadline: float) -> None:
    """Wait for a `retrieval serve` process to answer /health (fail the test, with its log,
    if it exits or ``deadline`` (time.monotonic) passes first)."""
    import time

    import httpx

    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)
