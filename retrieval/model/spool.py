"""Resumable encoding: records are encoded shard by shard, and each shard is spooled to disk.

A shard is ``shard_size`` consecutive records, a multiple of the batch size, so the batches,
and therefore the vectors, are the same whether a run was interrupted or not. A shard file holds
the image embeddings of its records that decoded, the reasons of those that did not, the
embeddings of their captions, and a fingerprint of its records (ids, paths, captions, image
file sizes and modification times). It is written with `retrieval.files.atomic_write`: a kill
leaves a whole shard or none. A resumed run re-uses every shard whose fingerprint still
matches and encodes only the others; a run that does not resume starts the spool afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..corpus import webdataset
from ..corpus.records import Record
from ..files import atomic_write

log = logging.getLogger(__name__)

KEY = "spool.json"


@dataclass(frozen=True)
class SpoolOptions:
    batch_size: int = 64
    workers: int | None = None
    max_pixels: int = 0
    shard_size: int = 2048  # records per shard; rounded up to a multiple of batch_size
    resume: bool = False
    progress: bool = True
    patches: bool = False  # also the image tower's patch tokens (build --patch-tokens)


@dataclass
class Encoded:
    """Everything a build needs from the encoder, in record order."""

    image_emb: np.ndarray  # (M, D) float32 unit vectors of the records that decoded
    positions: np.ndarray  # (M,) int64: position in ``records`` of each row of image_emb
    failures: dict[int, str]  # record position -> why it was skipped
    caption_emb: np.ndarray  # (C, D) float32: `caption_texts` of the kept records, in order
    reused: int = 0  # shards read back from an interrupted run
    patches: np.ndarray | None = None  # (M, P, W) fp16 patch tokens, rows as image_emb's


def caption_texts(records: Sequence[Record]) -> list[str]:
    """The captions that get encoded: every non-empty caption, record by record."""
    return [c for r in records for c in r.captions if c]


def encode(
    records: Sequence[Record],
    encoder,
    folder: Path,
    options: SpoolOptions,
    part: tuple[int, int] = (0, 1),
) -> Encoded | None:
    """Encode ``records`` through the spool in ``folder`` (see the module's docstring).

    ``part=(rank, size)``: encode only shards ``rank, rank + size, ...`` into a spool that
    `prepare` made ready, and return None: each of ``size`` processes spools its share, then
    one of them reads them all back (``part`` left at its default, ``resume`` set).
    """
    rank, size = part
    shard = _shard_size(options)
    if size == 1:
        prepare(folder, encoder, options)
    bar = tqdm(total=len(records), unit="img", desc="encoding", disable=not options.progress)
    parts, reused = [], 0
    for number, start in enumerate(range(0, len(records), shard)):
        chunk = records[start : start + shard]
        if number % size != rank:
            continue
        path = folder / f"shard-{number:06d}.npz"
        fingerprint = _fingerprint(chunk)
        found = _read(path, fingerprint)
        if found is None:
            found = _encode(chunk, encoder, options, bar)
            _write(path, found, fingerprint)
        else:
            reused += 1
            bar.update(len(chunk))
        parts.append((start, found))
    bar.close()
    if size > 1:
        log.info(
            "process %d of %d: spooled %d shards (%d were there)", rank, size, len(parts), reused
        )
        return None
    if reused:
        log.info("resumed: %d of %d shards were already encoded", reused, len(parts))
    return _join(parts, encoder.dim, reused)


def ranks_of(positions: np.ndarray, options: SpoolOptions, size: int) -> np.ndarray:
    """(N,) the rank whose shard holds each record position (``part`` in `encode`)."""
    return (np.asarray(positions) // _shard_size(options)) % size


def _shard_size(options: SpoolOptions) -> int:
    """``shard_size`` rounded up to whole batches: the same batches, interrupted or not."""
    return -(-max(1, options.shard_size) // options.batch_size) * options.batch_size


def prepare(folder: Path, encoder, options: SpoolOptions) -> None:
    """Make ``folder`` ready: keep what a resumable run spooled, else start afresh."""
    key = {
        **encoder.spec.identity().to_json(),
        "runtime": encoder.runtime.to_json(),  # what runs, after the device's choice
        "max_pixels": options.max_pixels,
        "batch_size": options.batch_size,
        "shard_size": _shard_size(options),
        "patches": options.patches,
    }
    _prepare(folder, key, options.resume)


def discard(folder: Path) -> None:
    """Drop a spool whose work has been published."""
    shutil.rmtree(folder, ignore_errors=True)


def _prepare(folder: Path, key: dict, resume: bool) -> None:
    old = None
    if (folder / KEY).is_file():
        try:
            old = json.loads((folder / KEY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
    if resume and old == key:
        # An interrupted write's ``.NAME.XXXXXXXX.tmp``: pathlib's * matches a leading dot too.
        for tmp in folder.glob("*.tmp"):
            tmp.unlink()
        return
    if resume and folder.exists():
        log.warning("nothing to resume: the interrupted run used another model or options")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with atomic_write(folder / KEY, "w", encoding="utf-8") as f:
        f.write(json.dumps(key, sort_keys=True))


def _fingerprint(chunk: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in chunk:
        try:
            st = webdataset.backing_file(r.image).stat()  # a tar member: its shard
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None
        h.update(json.dumps([r.id, str(r.image), list(r.captions), stamp]).encode())
    return h.hexdigest()


def _encode(chunk: Sequence[Record], encoder, options: SpoolOptions, bar) -> dict:
    patches: list[np.ndarray] | None = [] if options.patches else None
    emb, positions, failures = encoder.encode_image_files(
        [r.image for r in chunk],
        options.batch_size,
        options.workers,
        options.max_pixels,
        bar=bar,
        patches=patches,
    )
    kept = [chunk[p] for p in positions]
    out = {
        "image_emb": emb,
        "positions": positions,
        "failures": failures,
        "caption_emb": encoder.encode_texts(caption_texts(kept)),
    }
    if patches is not None:
        out["patches"] = np.concatenate(patches) if patches else np.zeros((0, 0, 0), np.float16)
    return out


def _write(path: Path, shard: dict, fingerprint: str) -> None:
    with atomic_write(path) as f:
        np.savez(
            f,
            image_emb=shard["image_emb"],
            positions=shard["positions"],
            caption_emb=shard["caption_emb"],
            failures=np.array(json.dumps({str(k): v for k, v in shard["failures"].items()})),
            fingerprint=np.array(fingerprint),
            **({"patches": shard["patches"]} if "patches" in shard else {}),
        )


def _read(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {
                "image_emb": z["image_emb"],
                "positions": z["positions"],
                "caption_emb": z["caption_emb"],
                "failures": {int(k): v for k, v in json.loads(str(z["failures"])).items()},
            } | ({"patches": z["patches"]} if "patches" in z.files else {})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log.warning("re-encoding %s: the spooled shard is unreadable (%s)", path.name, e)
        return None


def _join(parts: list[tuple[int, dict]], dim: int, reused: int) -> Encoded:
    empty = np.zeros((0, dim), np.float32)
    images = [s["image_emb"] for _, s in parts]
    captions = [s["caption_emb"] for _, s in parts]
    patches = [s["patches"] for _, s in parts if "patches" in s and len(s["patches"])]
    return Encoded(
        image_emb=np.ascontiguousarray(np.concatenate(images) if images else empty),
        positions=np.concatenate(
            [start + s["positions"] for start, s in parts] or [np.zeros(0, np.int64)]
        ).astype(np.int64),
        failures={start + p: why for start, s in parts for p, why in s["failures"].items()},
        caption_emb=np.ascontiguousarray(np.concatenate(captions) if captions else empty),
        reused=reused,
        patches=np.concatenate(patches) if patches else None,
    )
