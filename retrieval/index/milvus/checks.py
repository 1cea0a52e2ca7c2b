"""What `retrieval verify` checks of a Milvus-backed index, read from Milvus: the alias and
state, no change left half-done, the counts, every caption's item, and a sample of items with
their stored vectors for re-encoding (compared by `retrieval.index.verify`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..manifest import Manifest
from .backend import open_space
from .space import MAX_LIMIT, MilvusSpace


def _scan(space: MilvusSpace, collection: str, fields: list[str], filt: str) -> Iterator[dict]:
    """Every row of ``collection`` passing ``filt``, by primary-key windows (rows are dense
    numbers below the state's next free row; a window stays under Milvus's query limit)."""
    state = space._loaded().state
    end = state.next_caption if collection.endswith("_captions") else state.next_row
    for start in range(0, end, MAX_LIMIT):
        window = f"row >= {start} and row < {start + MAX_LIMIT} and ({filt})"
        yield from space.client.query(
            collection, filter=window, output_fields=fields, consistency_level="Strong"
        )


def consistency(manifest: Manifest, root: Path) -> list[tuple[str, list[str], str]]:
    """(check, problems, what was fine) for the state, the counts and the caption owners."""
    space, items = open_space(manifest, root)
    try:
        now = space.refresh()
        state = now.state
        fine = f"collection {now.items}, change {state.committed} committed"
        if state.pending:  # invisible to searches: not a fault of what is published
            fine += "; an add was interrupted (the next add, remove or compact rolls it back)"
        out: list[tuple[str, list[str], str]] = [("state", [], fine)]
        visible = state.visible()
        rows = {int(r["row"]) for r in _scan(space, now.items, ["row"], visible)}
        owners = [
            int(r["item"]) for r in _scan(space, now.captions, ["item"], state.visible("item"))
        ]
        counted = []
        if len(rows) != state.items or len(owners) != state.captions:
            counted.append(
                f"Milvus holds {len(rows)} items and {len(owners)} captions; the state row says "
                f"{state.items} and {state.captions}"
            )
        out.append(("counts", counted, f"{len(rows)} items, {len(owners)} captions"))
        orphans = sorted({o for o in owners if o not in rows})
        out.append(
            ("caption owners", [f"captions of missing item rows {orphans[:5]}"] if orphans else [],
             "every caption's item is there"),
        )  # fmt: skip
        return out
    finally:
        items.close()


def sample(manifest: Manifest, root: Path, n: int, seed: int):
    """``n`` seeded items ({"id", "path", "captions"}), their (n, D) stored image vectors and,
    per caption in order, its (C, D) stored vectors."""
    space, items = open_space(manifest, root)
    try:
        now = space.refresh()
        rows = np.array(
            sorted(int(r["row"]) for r in _scan(space, now.items, ["row"], now.state.visible()))
        )
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(rows, min(n, len(rows)), replace=False))
        images, _ = space.images_of(chosen)
        fields = ["row", "id", "path", "captions"]
        got = space._fetch(now.items, "row", chosen, fields)
        by_row = {int(r["row"]): r for r in got}
        picked = [by_row[int(r)] for r in chosen]
        caption_rows, _, caption_vectors, _ = space.captions_of(chosen)
        ids = items.caption_ids(caption_rows)
        by_id = dict(zip(ids, caption_vectors, strict=True))
        for it in picked:  # stored as {"all": [...]}: Milvus 2.3 keeps JSON objects only
            it["captions"] = it["captions"]["all"]
        wanted = [c["id"] for it in picked for c in it["captions"]]
        vectors = np.array([by_id[c] for c in wanted]).reshape(len(wanted), manifest.dim)
        return picked, images, vectors
    finally:
        items.close()
