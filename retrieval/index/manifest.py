"""``manifest.json``: what an index version is, written last as the version's commit mark.

It names the model the index was built with (and the checkpoint's sha256), the FAISS indexes
and their tuned search knobs, counts, the corpus, the querybank settings, checksums of every
file and the history of changes. Read and written here only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SearchError
from ..files import atomic_write, sha256_file
from ..model.spec import ModelSpec

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` durably: it is the last file of a build, its commit mark."""
    with atomic_write(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"format_version": FORMAT_VERSION, **manifest}, f, indent=2, sort_keys=True)


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def check_model(manifest: dict, spec: ModelSpec | None) -> None:
    """Refuse to query an index with a model other than the one it was built with."""
    if spec is None:
        return
    asked = spec.describe()
    same_weights = (
        asked["checkpoint_sha256"] == manifest.get("checkpoint_sha256")
        if manifest.get("checkpoint_sha256") or asked["checkpoint_sha256"]
        else asked["pretrained"] == manifest.get("pretrained")
    )
    if asked["model"] != manifest["model"] or not same_weights:
        raise SearchError(
            f"index {manifest['name']!r} was built with model {manifest['model']} "
            f"(pretrained: {manifest.get('pretrained') or 'none'}), not {asked['model']} "
            f"(pretrained: {asked['pretrained'] or 'none'}); search it without --model (or "
            "with --pretrained alone, for its checkpoint at a new path), or rebuild it"
        )


def spec_from_manifest(manifest: dict) -> ModelSpec:
    """The model an index was built with; its checkpoint must still be there, unchanged."""
    pretrained, sha = manifest.get("pretrained"), manifest.get("checkpoint_sha256")
    if sha:
        path = Path(pretrained)
        if not path.is_file():
            raise SearchError(
                f"the checkpoint this index was built with is gone: {path}; if it moved, put it "
                "back, or give search, serve and bench its new path with --pretrained"
            )
        if sha256_file(path) != sha:
            raise SearchError(f"the checkpoint {path} changed since the index was built")
    return ModelSpec(manifest["model"], pretrained)
