"""Is a published version whole? A cheap check on every open, a full one before a change.

A version's manifest lists every file with its sha256 and, since format 1 gained the key, its
size in bytes. Every command that opens an index (search, serve, bench, info, add, remove,
compact) checks that each listed file is there at its recorded size: a stat per file, so a
deleted or cut-short file is refused in one line before FAISS or LMDB read it. A writer also
hashes every file of the version it starts from before publishing a new one, so a change never
carries an altered file (hard-linked or copied) into a version that looks sound. `verify`
hashes everything; ``verify --repair`` and ``--rollback`` (`retrieval.index.repair`) are the ways
back that every refusal names.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DamagedIndexError, SearchError
from ..files import sha256_file
from . import layout
from .manifest import MANIFEST, Manifest, read_manifest


def way_out(name: str) -> str:
    return (
        f"`retrieval verify {name} --repair` rebuilds what can be derived, "
        f"`retrieval verify {name} --rollback` returns to the previous version"
    )


def damaged(name: str, folder: Path, problem: str) -> DamagedIndexError:
    return DamagedIndexError(f"index {name!r} is damaged: {problem} (in {folder}); {way_out(name)}")


def unopenable(name: str, e: Exception) -> SearchError:
    """Index ``name``'s files failed to open with ``e`` (its last line is the cause)."""
    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return SearchError(
        f"index {name!r} cannot be opened ({msg}); `retrieval verify {name}` checks its files"
    )


def size_problems(folder: Path, manifest: Manifest) -> list[str]:
    """Files the manifest lists that are missing or of another size (cheap: one stat each)."""
    out = []
    for rel in sorted(manifest.sha256):
        path = folder / rel
        if not path.is_file():
            out.append(f"{rel} is missing")
        elif rel in manifest.sizes and path.stat().st_size != manifest.sizes[rel]:
            size = path.stat().st_size
            out.append(f"{rel} has {size} bytes, the manifest says {manifest.sizes[rel]}")
    return out


def hash_problems(folder: Path, manifest: Manifest) -> list[str]:
    """Files whose content is not what the manifest recorded (reads every byte)."""
    out = size_problems(folder, manifest)
    bad = {p.split(" ", 1)[0] for p in out}
    for rel, digest in sorted(manifest.sha256.items()):
        if rel not in bad and sha256_file(folder / rel) != digest:
            out.append(f"{rel} does not match its checksum")
    return out


def open_version(name: str, index_dir: str | Path | None = None) -> tuple[Path, Manifest]:
    """The version ``name`` points to and its manifest, checked cheaply; a one-line
    `DamagedIndexError` naming the file and the way back when it is not whole."""
    folder = resolve(name, index_dir)
    manifest = read_manifest(folder)
    problems = size_problems(folder, manifest)
    if problems:
        raise damaged(name, folder, problems[0])
    return folder, manifest


def resolve(name: str, index_dir: str | Path | None = None) -> Path:
    """`layout.resolve`, with a version whose manifest is gone reported as damaged."""
    root = layout.index_root(index_dir)
    link = root / layout.check_name(name)
    if link.is_symlink() and not link.resolve().is_dir():
        raise damaged(name, link.resolve(), "the version folder itself is missing")
    if link.is_symlink() and not (link / MANIFEST).exists():
        raise damaged(name, link.resolve(), f"{MANIFEST} is missing")
    return layout.resolve(name, index_dir)


def check_before_change(name: str, folder: Path) -> None:
    """Raise `DamagedIndexError` unless every file of ``folder`` (the version a writer starts
    from) has the content its manifest recorded: nothing altered is carried forward."""
    problems = hash_problems(folder, read_manifest(folder))
    if problems:
        raise damaged(name, folder, problems[0])
