"""Decode once, train many times: a memory-mapped cache of resized images.

Training reads every image once per epoch. Decoding and resizing JPEGs on two cores costs more
than a small model's forward and backward pass, so the training set is decoded once (in
DataLoader workers, with the same safety checks as the build) into an (N, H, W, 3) uint8 array
on disk, at the model's input size. Each epoch then reads a batch with one slice of a memory map
and normalises it on the fly. The cache is keyed by the image files (path, size, mtime) and the
input size, so a resumed or repeated run reuses it. The array, then its ``.json`` of failures,
are written through `retrieval.files`, so a cache found with both is a whole, finished decode.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm

from ..corpus import webdataset
from ..corpus.images import BadImage, load_image
from ..files import atomic_path, atomic_write

log = logging.getLogger(__name__)


def _fingerprint(paths: Sequence[Path], size: int) -> str:
    h = hashlib.sha256(f"v1 {size}".encode())
    for p in paths:
        try:
            st = webdataset.backing_file(p).stat()  # a tar member: its tar
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()[:16]


class _Resized(Dataset):
    def __init__(self, paths: Sequence[Path], size: int, max_pixels: int) -> None:
        self.paths, self.max_pixels = list(paths), max_pixels
        # open_clip's eval geometry: shorter side to `size` (bicubic), then a centre crop.
        self.fit = transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(size),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, np.asarray(self.fit(load_image(self.paths[i], self.max_pixels))), None
        except BadImage as e:
            return i, None, e.reason
        except Exception as e:
            return i, None, f"decode error ({type(e).__name__})"


def _collate(batch):
    return batch


def load_or_build(
    paths: Sequence[Path],
    size: int,
    cache_dir: Path,
    workers: int = 1,
    max_pixels: int = 40_000_000,
    progress: bool = False,
) -> tuple[np.ndarray, dict[int, str]]:
    """``(pixels (N, size, size, 3) uint8 memmap, failures {position: reason})``.

    Rows of failed images are zero and must not be used.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _fingerprint(paths, size)
    data, meta = cache_dir / f"pixels-{key}.npy", cache_dir / f"pixels-{key}.json"
    if data.is_file() and meta.is_file():
        failures = {int(k): v for k, v in json.loads(meta.read_text())["failures"].items()}
        return np.load(data, mmap_mode="r"), failures
    for old in [*cache_dir.glob(f".{data.name}.*.tmp"), data.with_suffix(".tmp.npy")]:
        old.unlink(missing_ok=True)  # a killed decode's (also under the older name), maybe GBs
    with atomic_path(data) as tmp:
        failures = _decode(paths, size, tmp, workers, max_pixels, progress)
    with atomic_write(meta, "w", encoding="utf-8") as f:
        f.write(json.dumps({"size": size, "count": len(paths), "failures": failures}))
    return np.load(data, mmap_mode="r"), failures


def _decode(
    paths: Sequence[Path], size: int, dest: Path, workers: int, max_pixels: int, progress: bool
) -> dict[int, str]:
    """Decode ``paths`` into a new ``.npy`` array at ``dest``; return the failures."""
    out = np.lib.format.open_memmap(
        dest, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3)
    )
    failures: dict[int, str] = {}
    loader = DataLoader(
        _Resized(paths, size, max_pixels), batch_size=32, num_workers=workers, collate_fn=_collate
    )
    with tqdm(total=len(paths), unit="img", desc="decoding once", disable=not progress) as bar:
        for batch in loader:
            for i, arr, reason in batch:
                if reason is None:
                    out[i] = arr
                else:
                    failures[i] = reason
            bar.update(len(batch))
    out.flush()
    del out  # unmapped before atomic_path fsyncs and renames the file
    return failures


def normaliser(preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) of a model's preprocessing, shaped (1, 3, 1, 1) for NCHW batches."""
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, transforms.Normalize):
            mean, std = torch.tensor(t.mean), torch.tensor(t.std)
            return mean.view(1, 3, 1, 1).float(), std.view(1, 3, 1, 1).float()
    raise ValueError("the model's preprocessing has no Normalize step")


def to_model_input(batch: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32, normalised like the model's preprocess."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std
