"""What `retrieval sync` changes: a corpus compared with the index built from it.

An item is **new** when its id is not indexed, **gone** when the index holds an id the corpus no
longer lists, and **changed** when its path, captions or metadata differ from the indexed ones,
or its file does: same size and modification time means unchanged, else the content hash
decides (a file touched but not edited is not a change). Items indexed before fingerprints were
recorded, and tar members, are compared by path, captions and metadata only. The lifecycle
applies a plan as one version (`retrieval.index.lifecycle.add` with ``sync``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..corpus.records import Record
from ..files import sha256_file
from .store import Store


@dataclass
class SyncPlan:
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)

    def summary(self, limit: int = 5) -> str:
        """One line per kind of change, with its first ids."""
        lines = []
        for kind, ids in (("new", self.new), ("changed", self.changed), ("gone", self.gone)):
            more = f", ... ({len(ids)} in all)" if len(ids) > limit else ""
            lines.append(
                f"{kind:<8} {len(ids)}" + (f": {', '.join(ids[:limit])}{more}" if ids else "")
            )
        return "\n".join(lines)


def plan(records: list[Record], store: Store) -> SyncPlan:
    """Compare ``records`` (unique ids, in corpus order) with ``store``'s items."""
    out = SyncPlan()
    listed = set()
    for r in records:
        listed.add(r.id)
        item = store.item(r.id)
        if item is None:
            out.new.append(r.id)
        elif _changed(r, item):
            out.changed.append(r.id)
    out.gone = [it["id"] for it in store.iter_items() if it["id"] not in listed]
    return out


def _changed(record: Record, item: dict[str, Any]) -> bool:
    captions = [c for c in record.captions if c]  # empty captions are never indexed
    if str(record.image) != item.get("path") or captions != [c["text"] for c in item["captions"]]:
        return True
    if (record.extra or {}) != item.get("extra", {}):
        return True
    return _file_changed(Path(record.image), item.get("file"))


def _file_changed(path: Path, known: dict[str, Any] | None) -> bool:
    if known is None:
        return False  # nothing recorded to compare with
    try:
        st = path.stat()
    except OSError:
        return True  # listed but unreadable now: re-encoding reports it
    if st.st_size == known["size"] and st.st_mtime_ns == known["mtime_ns"]:
        return False
    return sha256_file(path) != known["sha256"]
