"""Corpus readers: every supported layout becomes a stream of `Record`s.

Formats (autodetected by `read_corpus`):

- folder: a tree of images; ``photo.jpg`` may have a sidecar ``photo.txt`` with one caption per
  line. Ids are the image paths relative to the folder, without the extension.
- csv / tsv: one row per (image, caption) pair, columns ``filepath`` and ``title`` by default
  (open_clip's names); rows sharing an image are one item with several captions.
- jsonl (or a .json list of the same objects): ``{"image", "caption" | "captions", "id"?, ...}``;
  every other key is kept as the item's metadata.
- coco: a COCO captions file (``images`` + ``annotations``).
- webdataset: tar shards as img2dataset writes them (one .tar, a folder of them, or a brace
  pattern ``shards/{00000..00009}.tar``); read by `retrieval.corpus.webdataset`.

Relative image paths resolve against ``image_root`` when given, else the corpus file's folder;
COCO-style layouts that keep photos in an ``images/`` folder beside the annotation file are found
without help. Reading never opens images: decoding and its checks live in `retrieval.corpus.images`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import CorpusError
from . import webdataset
from .records import IMAGE_SUFFIXES, ReadOptions, Record

log = logging.getLogger(__name__)

_FLICKR8K_LINE = re.compile(r"^(\S+?\.(?:jpe?g|png))#(\d+)\t(.*)$", re.IGNORECASE)


_ANNOTATIONS = (".csv", ".tsv", ".jsonl", ".json")


def _annotation_file(p: Path) -> bool:
    """A corpus file, not a sidecar of one image (``a.json`` / ``a.jpg.json`` beside
    ``a.jpg``) nor img2dataset's ``00000_stats.json``."""
    if p.suffix.lower() not in _ANNOTATIONS or p.name.endswith("_stats.json") or not p.is_file():
        return False
    if Path(p.stem).suffix.lower() in IMAGE_SUFFIXES:  # IMG_1.jpg.json
        return False
    return not any(p.with_suffix(s).exists() for x in IMAGE_SUFFIXES for s in (x, x.upper()))


def detect_format(path: Path) -> str:
    """Name the layout of ``path`` (one of `FORMATS`), or raise `CorpusError`."""
    if webdataset.is_shards(path):  # before is_dir: a folder of shards is not a folder of images
        return "webdataset"
    if path.is_dir():
        # A folder beside its own annotation file: the file is what the user meant, or the
        # images would be indexed without their captions.
        listed = sorted(p.name for p in path.iterdir() if _annotation_file(p))
        if listed:
            raise CorpusError(
                f"{path} holds {', '.join(listed[:3])}: give that file as the corpus, or "
                "--format folder to index the folder's images (captions from .txt sidecars)"
            )
        return "folder"
    if not path.is_file():
        raise CorpusError(f"corpus not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        with path.open(encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16)
        if head.lstrip()[:1] == "[":
            return "jsonl"
        if head.lstrip()[:1] == "{":
            return "karpathy" if '"sentences"' in head else "coco"
    if suffix == ".txt":
        with path.open(encoding="utf-8", errors="replace") as f:
            if _FLICKR8K_LINE.match(f.readline().rstrip("\n")):
                return "flickr8k"
    raise CorpusError(
        f"cannot tell the corpus format of {path}: expected a folder, .csv/.tsv, .jsonl, "
        "a .json list of records, a COCO captions or Karpathy split .json, a Flickr8k "
        "token file, or WebDataset .tar shards"
    )


def read_corpus(path: str | Path, options: ReadOptions | None = None) -> Iterator[Record]:
    """Yield the records of the corpus at ``path`` in file order.

    Records may repeat an id (the build reports and skips the repeats) and may point to missing
    or broken images (the decoder reports those); captions are stripped but not filtered.
    """
    options = options or ReadOptions()
    # Absolute: the paths are stored in the index, which is used from any folder later.
    # Not resolve(): a symlinked data folder keeps the name the user gave it.
    path = Path(path).expanduser().absolute()
    if options.image_root is not None:
        options = replace(options, image_root=Path(options.image_root).expanduser().absolute())
    fmt = options.format or detect_format(path)
    if fmt not in _READERS:
        raise CorpusError(f"unknown corpus format {fmt!r}; choose one of {', '.join(FORMATS)}")
    log.info("reading %s corpus %s", fmt, path)
    records = _READERS[fmt](path, options)
    if options.split and fmt != "karpathy":  # any format: records whose "split" field matches
        records = (r for r in records if r.extra.get("split") == options.split)
    yield from records


def _resolver(corpus_file: Path, options: ReadOptions):
    root = options.image_root or corpus_file.parent
    fallback = corpus_file.parent / "images"

    def resolve(value: str) -> Path:
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        candidate = root / p
        if options.image_root is None and not candidate.exists() and (fallback / p).exists():
            return fallback / p
        return candidate

    return resolve


def _clean(captions: Any) -> tuple[str, ...]:
    if captions is None:
        return ()
    if not isinstance(captions, list | tuple):  # one caption, of whatever type
        captions = [captions]
    # A null or non-text caption becomes empty, which the build reports per caption.
    return tuple(_caption_text(c) for c in captions)


def _caption_text(c: Any) -> str:
    return str(c).strip() if isinstance(c, str | int | float) and not isinstance(c, bool) else ""


def _read_folder(root: Path, options: ReadOptions) -> Iterator[Record]:
    """Images under ``root``; ``photo.txt`` beside ``photo.jpg`` holds its captions, one a line,
    and ``photo.json`` (or ``photo.jpg.json``), an object, its metadata, as in a WebDataset
    sample: its ``"caption"`` is used when there is no ``.txt``; the other keys are metadata."""
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        if not image.is_file():
            continue
        item = image.relative_to(root).with_suffix("").as_posix()
        named = [image.with_suffix(".json"), image.with_name(image.name + ".json")]
        json_path = next((j for j in named if j.is_file()), named[0])  # IMG_1.jpg.json: Takeout
        meta = _sidecar_json(json_path)
        if meta is None:
            yield Record(id=item, image=image, problem=f"{json_path.name} is not a JSON object")
            continue
        sidecar = image.with_suffix(".txt")
        captions: tuple[str, ...] = ()
        if sidecar.is_file():
            lines = sidecar.read_text(encoding="utf-8", errors="replace").splitlines()
            captions = _clean([line for line in lines if line.strip()] or [""])
        elif meta.get("caption") is not None:
            captions = _clean(meta["caption"])
        extra = {k: v for k, v in meta.items() if k != "caption"}
        yield Record(id=item, image=image, captions=captions, extra=extra)


def _sidecar_json(path: Path) -> dict | None:
    """The object in ``path`` ({} when there is no such file); None when it holds no object."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def _read_csv(path: Path, options: ReadOptions) -> Iterator[Record]:
    resolve = _resolver(path, options)
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:  # -sig: Excel's BOM
        lines = f.readlines()
    first = lines[0] if lines else ""
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in first else ","
    fields = next(csv.reader([first], delimiter=delimiter), [])
    for col in (options.image_col, options.caption_col):
        if col not in fields:
            raise CorpusError(
                f"{path}: no column {col!r} (columns: {', '.join(fields)}); "
                "name them with --image-col / --caption-col"
            )
    if options.id_col and options.id_col not in fields:
        raise CorpusError(f"{path}: no id column {options.id_col!r}")
    grouped: dict[str, dict[str, Any]] = {}
    skip = {options.image_col, options.caption_col, options.id_col}
    for lineno, values, problem in _csv_rows(lines, delimiter):
        if not problem and not any(v.strip() for v in values):
            continue  # ",," or spaces: an empty row, as spreadsheets write them
        row = dict(zip(fields, values, strict=False))  # short rows: later columns empty
        problem = problem or _row_problem(values, len(fields), row, options.image_col)
        if problem:
            yield Record(id=f"{path.name}:{lineno}", image=Path(), problem=problem)
            continue
        image = (row.get(options.image_col) or "").strip()
        key = (row.get(options.id_col) or "").strip() if options.id_col else image
        entry = grouped.setdefault(key or image, {"image": image, "captions": [], "extra": {}})
        entry["captions"].append(row.get(options.caption_col) or "")
        entry["extra"].update({k: v for k, v in row.items() if k not in skip and k})
    for key, entry in grouped.items():
        item_id = key if options.id_col else Path(entry["image"]).with_suffix("").as_posix()
        yield Record(item_id, resolve(entry["image"]), _clean(entry["captions"]), entry["extra"])


def _row_problem(values: list[str], width: int, row: dict, image_col: str) -> str:
    if any(v.strip() for v in values[width:]):  # empty extras: a trailing comma
        return f"{len(values)} fields where the header has {width} (unquoted comma?)"
    if not (row.get(image_col) or "").strip():
        return f"no {image_col!r} value"
    return ""


def _csv_rows(lines: list[str], delimiter: str) -> Iterator[tuple[int, list[str], str]]:
    """``(line number, values, problem)`` of each non-blank row after the header.

    Lenient, as csv reads by default (``"Stop" sign`` is a value), except where a row runs over
    several lines: that must parse strictly, or it is a quote never closed, which would swallow
    every later row as text. Such a row is reported and reading resumes on the line after it.
    """
    pos = 1  # index in ``lines`` where the next reader starts
    while pos < len(lines):
        reader = csv.reader((lines[i] for i in range(pos, len(lines))), delimiter=delimiter)
        start, resume = pos, None
        while resume is None:
            try:
                values = next(reader, None)
            except csv.Error as e:  # e.g. a swallowed "field" over csv's size limit
                values, problem = [], str(e)
            else:
                problem = ""
            if values is None:
                return
            end = pos + reader.line_num  # index after the row's last line
            if not problem and end - start > 1 and not _strict(lines[start:end], delimiter):
                problem = "a quote is never closed"
            if problem:
                yield start + 1, [], f"malformed CSV row ({problem}); read on from the next line"
                resume = start + 1
            elif values:
                yield start + 1, values, ""
            start = end
        pos = resume


def _strict(lines: list[str], delimiter: str) -> bool:
    try:
        for _ in csv.reader(lines, delimiter=delimiter, strict=True):
            pass
    except csv.Error:
        return False
    return True


def _read_jsonl(path: Path, options: ReadOptions) -> Iterator[Record]:
    resolve = _resolver(path, options)
    if path.suffix.lower() == ".json":
        try:
            objects = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: not valid JSON ({e})") from None
        lines = list(enumerate(objects, 1))
    else:
        lines = _json_lines(path)
    for lineno, obj in lines:
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            problem = "malformed record" if obj is None else "record without an 'image' string"
            yield Record(id=f"{path.name}:{lineno}", image=Path(), problem=problem)
            continue
        captions = obj.get("captions", obj.get("caption"))
        extra = {k: v for k, v in obj.items() if k not in ("image", "caption", "captions", "id")}
        item_id = str(obj["id"]) if obj.get("id") is not None else _path_id(obj["image"])
        yield Record(item_id, resolve(obj["image"]), _clean(captions), extra)


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError:
                yield lineno, None


def _read_coco(path: Path, options: ReadOptions) -> Iterator[Record]:
    resolve = _resolver(path, options)
    data = _load_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise CorpusError(f"{path}: a COCO captions file needs 'images' and 'annotations'")
    captions: dict[Any, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann.get("image_id"), []).append(ann.get("caption") or "")
    for img in data["images"]:
        extra = {k: v for k, v in img.items() if k not in ("id", "file_name")}
        yield Record(
            id=str(img["id"]),
            image=resolve(img.get("file_name", "")),
            captions=_clean(captions.get(img["id"], [])),
            extra=extra,
        )


def _read_karpathy(path: Path, options: ReadOptions) -> Iterator[Record]:
    """Karpathy's split files (dataset_coco.json, dataset_flickr30k.json, dataset_flickr8k.json)."""
    resolve = _resolver(path, options)
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CorpusError(f"{path}: a Karpathy split file needs an 'images' list")
    for img in data["images"]:
        if options.split and img.get("split") != options.split:
            continue
        rel = Path(img.get("filepath", "")) / img["filename"]
        item_id = str(img.get("cocoid", img.get("imgid", rel.with_suffix("").as_posix())))
        captions = [s.get("raw", " ".join(s.get("tokens", []))) for s in img.get("sentences", [])]
        extra = {"split": img.get("split"), "filename": img["filename"]}
        yield Record(item_id, resolve(rel.as_posix()), _clean(captions), extra)


def _read_flickr8k(path: Path, options: ReadOptions) -> Iterator[Record]:
    """``Flickr8k.token.txt``: ``image.jpg#n<TAB>caption``; ``split_file`` lists images to keep."""
    resolve = _resolver(path, options)
    keep = None
    if options.split_file:
        lines = Path(options.split_file).read_text(encoding="utf-8").splitlines()
        keep = {ln.strip() for ln in lines if ln.strip()}
    grouped: dict[str, list[str]] = {}
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            m = _FLICKR8K_LINE.match(line.rstrip("\r\n"))
            if m is None and line.strip():
                problem = "not an 'image.jpg#n<TAB>caption' line"
                yield Record(id=f"{path.name}:{lineno}", image=Path(), problem=problem)
            elif m and (keep is None or m.group(1) in keep):
                grouped.setdefault(m.group(1), []).append(m.group(3))
    for name, captions in grouped.items():
        yield Record(_path_id(name), resolve(name), _clean(captions))


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e})") from None


def _path_id(value: str) -> str:
    return Path(value).with_suffix("").as_posix()


# The one table of formats: `--format`'s choices and `detect_format`'s answers are its keys.
_READERS = {
    "folder": _read_folder,
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "coco": _read_coco,
    "karpathy": _read_karpathy,
    "flickr8k": _read_flickr8k,
    "webdataset": webdataset.read_shards,
}
FORMATS = tuple(_READERS)
