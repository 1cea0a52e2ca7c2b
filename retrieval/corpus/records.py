"""What a corpus is made of: `Record`s (an image and its captions), and how to read them.

Readers produce records without opening images; `unique_records` is the one place that drops
unreadable records and repeated ids, reporting each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Record:
    """One item of a corpus: an image and its captions, before any decoding."""

    id: str
    image: Path
    captions: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # set by a reader when the record itself is unreadable


@dataclass(frozen=True)
class ReadOptions:
    """How to read a corpus; every field has a default that fits the common layouts."""

    format: str | None = None  # None: autodetect
    image_col: str = "filepath"
    caption_col: str = "title"
    id_col: str | None = None
    image_root: Path | None = None
    split: str | None = None  # keep only records whose "split" is this (Karpathy, JSONL, CSV)
    split_file: Path | None = None  # Flickr8k: a file listing the image names to keep


def unique_records(records) -> tuple[list[Record], list[tuple[str, str, str]]]:
    """Drop unreadable records and repeated ids (the first occurrence wins).

    Returns ``(records, skipped)``, ``skipped`` as ``(id, path, reason)``.
    """
    seen: set[str] = set()
    out, skipped = [], []
    for r in records:
        reason = r.problem or ("empty id" if not r.id else "duplicate id" if r.id in seen else "")
        if reason:
            skipped.append((r.id, "" if r.problem else str(r.image), reason))
        else:
            seen.add(r.id)
            out.append(r)
    return out, skipped
