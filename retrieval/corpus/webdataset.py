"""WebDataset tar shards (the layout img2dataset writes) as a corpus, read as a stream.

A corpus is one ``.tar`` file, a folder of ``*.tar`` shards (read in name order), or a brace
pattern such as ``shards/{00000..00009}.tar`` (ranges keep their zero padding; ``{a,b}`` lists
work too; braces do not nest). Each shard is an uncompressed tar whose members are grouped
into samples by key, the member name up to the first dot of its base name: ``000000001.jpg``,
``000000001.txt`` and ``000000001.json`` are sample ``000000001``. Members of a sample are
contiguous, as WebDataset requires, so a shard is read once, front to back, one sample at a
time, and image bytes are never read at this stage.

A sample becomes a `retrieval.corpus.records.Record`: id = its key; captions = the non-empty
lines of its ``.txt``, else the ``"caption"`` of its ``.json``; extra = the ``.json`` object without
``"caption"``. A sample without an image, with an unreadable ``.json``, or a shard that is
missing or not a tar, becomes a record with a ``problem``, so the build reports it.

The image of a record is a reference into its shard, stored as a path string::

    <absolute tar path>#<member name>@<offset of the member's data>:<size in bytes>

e.g. ``/data/shards/00000.tar#000000001.jpg@1536:20734``. `member_bytes` reads it back with one
seek and one read, without scanning the tar; `retrieval.corpus.images.load_image` decodes it
like any file. The tar path is the shortest prefix ending in ``.tar#``, so a folder name must
not itself contain ``.tar#``.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .records import IMAGE_SUFFIXES, ReadOptions, Record

log = logging.getLogger(__name__)

_REFERENCE = re.compile(
    r"^(?P<tar>.+?\.tar)#(?P<name>.*)@(?P<offset>\d+):(?P<size>\d+)$", re.IGNORECASE
)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# WebDataset's own split of a member name: key = up to the first dot of the base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")
_IMAGE_EXTS = frozenset(s.lstrip(".") for s in IMAGE_SUFFIXES)


class Member(NamedTuple):
    """A parsed reference: where a member's bytes are inside its tar."""

    tar: Path
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.tar}#{self.name}@{self.offset}:{self.size}"


def parse_reference(ref: str | Path) -> Member | None:
    """The member ``ref`` points to, or None when ``ref`` is an ordinary path."""
    m = _REFERENCE.match(str(ref))
    if m is None:
        return None
    return Member(Path(m["tar"]), m["name"], int(m["offset"]), int(m["size"]))


def member_bytes(ref: str | Path | Member) -> bytes | None:
    """The bytes of a tar member reference; None when ``ref`` is not one.

    Raises `FileNotFoundError` when the tar is gone, `OSError` when it cannot be read, and
    `EOFError` when it ends before the member does (a truncated or rewritten shard).
    """
    member = ref if isinstance(ref, Member) else parse_reference(ref)
    if member is None:
        return None
    with member.tar.open("rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise EOFError(f"{member.tar} ends before the {member.size} bytes of {member.name}")
    return data


def backing_file(path: str | Path) -> Path:
    """The file on disk holding ``path``'s bytes: its tar for a reference, else itself."""
    member = parse_reference(path)
    return member.tar if member is not None else Path(path)


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{0000..0009}`` ranges (zero padding kept) and ``{a,b}`` lists, left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tails = pattern[: m.start()], m[1], expand_braces(pattern[m.end() :])
    rng = _RANGE.match(body)
    if rng:
        lo, hi = int(rng[1]), int(rng[2])
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0" for s in rng.groups())
        width = max(len(rng[1]), len(rng[2])) if padded else 0
        step = 1 if hi >= lo else -1
        choices = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # not a pattern (e.g. "{abc}"): keep it literally
        choices = [m[0]]
    return [head + c + t for c in choices for t in tails]


def is_pattern(path: str | Path) -> bool:
    """Whether ``path`` is a brace pattern rather than an existing file or folder."""
    text = str(path)
    return not Path(text).exists() and expand_braces(text) != [text]


def is_shards(path: Path) -> bool:
    """Whether ``path`` looks like WebDataset shards: a ``.tar``, a folder of them, a pattern.

    A folder counts when it holds ``*.tar`` files and no images at its top level: img2dataset
    writes ``.parquet`` and ``_stats.json`` files beside its shards.
    """
    if is_pattern(path):
        return True
    if path.is_file():
        return path.suffix.lower() == ".tar"
    if not path.is_dir():
        return False
    found = False
    for p in path.iterdir():
        suffix = p.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return False
        found = found or (suffix == ".tar" and p.is_file())
    return found


def shard_paths(source: Path) -> list[Path]:
    """The shards of ``source`` in reading order (a pattern's may not all exist)."""
    if is_pattern(source):
        return [Path(p) for p in expand_braces(str(source))]
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix.lower() == ".tar" and p.is_file())
    return [source]


def read_shards(source: Path, options: ReadOptions | None = None) -> Iterator[Record]:
    """Yield the records of every shard of ``source`` (see the module's docstring)."""
    shards = shard_paths(source)
    log.info("reading %d webdataset shards from %s", len(shards), source)
    for shard in shards:
        yield from _read_shard(shard)


@dataclass
class _Sample:
    key: str
    image: Member | None = None
    text: str | None = None
    meta: bytes | None = None
    extra_images: list[str] = field(default_factory=list)


def _read_shard(shard: Path) -> Iterator[Record]:
    if not shard.is_file():
        yield Record(id=str(shard), image=Path(), problem="missing shard")
        return
    tar_path = shard.resolve()
    sample: _Sample | None = None
    try:
        # "r:" reads headers in order and seeks over image data instead of reading it.
        with tarfile.open(tar_path, mode="r:") as tar:
            for info in _members(tar):
                m = _KEY_EXT.match(info.name)
                if not info.isfile() or m is None:
                    continue
                key, ext = m[1].removeprefix("./"), m[2].lower()
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield _record(sample)
                    sample = _Sample(key)
                _add(sample, tar, info, ext, tar_path)
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("%s: unreadable from here on (%s)", shard, e)
        if sample is not None:
            yield _record(sample)
        yield Record(id=str(shard), image=Path(), problem="unreadable shard")
        return
    if sample is not None:
        yield _record(sample)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (info := tar.next()) is not None:
        # TarFile remembers every header it reads; forget them so memory stays flat per shard.
        tar.members.clear()
        yield info


def _add(
    sample: _Sample, tar: tarfile.TarFile, info: tarfile.TarInfo, ext: str, path: Path
) -> None:
    if ext in _IMAGE_EXTS:
        if sample.image is None:
            sample.image = Member(path, info.name, info.offset_data, info.size)
        else:
            sample.extra_images.append(info.name)
    elif ext in ("txt", "json"):
        f = tar.extractfile(info)
        data = f.read() if f is not None else b""
        if ext == "txt":
            sample.text = data.decode("utf-8", errors="replace")
        else:
            sample.meta = data


def _record(sample: _Sample) -> Record:
    if sample.extra_images:
        log.debug("sample %s: using %s, ignoring %s", sample.key, sample.image, sample.extra_images)
    meta: Any = {}
    if sample.meta is not None:
        try:
            meta = json.loads(sample.meta)
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            return Record(id=sample.key, image=Path(), problem="malformed json")
    if sample.image is None:
        return Record(id=sample.key, image=Path(), problem="no image in sample")
    lines = (sample.text or "").splitlines()
    captions = [line.strip() for line in lines if line.strip()]
    caption = meta.get("caption")
    if not captions and caption is not None:  # img2dataset writes null for "no caption"
        captions = [str(c).strip() for c in (caption if isinstance(caption, list) else [caption])]
    extra = {k: v for k, v in meta.items() if k != "caption"}
    return Record(sample.key, Path(str(sample.image)), tuple(captions), extra)
