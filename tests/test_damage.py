"""Trust under faults (#20): a damaged index is refused in one line by every command, a writer
never publishes on top of one, and `verify --repair` / `--rollback` are the ways back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retrieval.cli import main
from retrieval.corpus import synthetic
from retrieval.index import layout
from retrieval.index.manifest import MANIFEST, read_manifest

TINY = ("--model", "tiny-vit", "--random-init")
QUIET = ("--no-progress", "--workers", "0")
FILES = (
    "image.faiss",
    "caption.faiss",
    "meta.lmdb/data.mdb",
    "embeddings/image.npy",
    "embeddings/caption_owner.npy",
    "embeddings/image.qbnorm.npy",
    "skipped.jsonl",
    MANIFEST,
)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    return synthetic.generate(root / "a", n=24, seed=7), synthetic.generate(root / "b", n=5, seed=8)


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpora):
    """An index of two versions (build, then add), so that one can be rolled back to."""
    root = tmp_path_factory.mktemp("indexes")
    a, b = corpora
    run(root, "build", str(a), "--name", "x", "--index", "HNSW16", *TINY, *QUIET)
    run(root, "add", "x", str(b), *QUIET)
    return root


def run(root: Path, *args: str, code: int = 0):
    result = CliRunner().invoke(main, [*args, "--index-dir", str(root)])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result


def fresh(built: Path, tmp_path: Path) -> Path:
    root = tmp_path / "indexes"
    shutil.copytree(built, root, symlinks=True)
    return root


def damage(folder: Path, rel: str, how: str) -> None:
    path = folder / rel
    if how == "delete":
        path.unlink()
    elif path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 2)
    else:  # an empty file (no skips) cut short cannot be: it grows instead
        path.write_bytes(b"x")


def commands(corpus: Path) -> dict[str, tuple[str, ...]]:
    return {
        "search": ("search", "x", "--text", "a red square"),
        "add": ("add", "x", str(corpus), *QUIET),
        "remove": ("remove", "x", "--id", "nothing-of-the-kind"),
        "compact": ("compact", "x"),
        "info": ("info", "x"),
        "serve": ("serve", "x", "--port", "0"),
        "bench": ("bench", str(corpus), "--index", "x", "-k", "1"),
    }


@pytest.mark.parametrize("rel", FILES)
@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_every_command_refuses_a_damaged_index_in_one_line(built, corpora, tmp_path, rel, how):
    root = fresh(built, tmp_path)
    folder = layout.resolve("x", root)
    damage(folder, rel, how)
    for command, args in commands(corpora[1]).items():
        out = run(root, *args, code=1).output.strip()
        assert len(out.splitlines()) == 1, (command, out)
        assert "is damaged" in out and rel in out and "'x'" in out, (command, out)
        assert "--repair" in out or "--rollback" in out, (command, out)
        assert (root / "x").resolve() == folder, command  # nothing published on top


def test_a_writer_refuses_an_altered_file_it_would_carry_over(built, corpora, tmp_path):
    # Same size, other bytes: the cheap check passes, the writer's hash does not.
    root = fresh(built, tmp_path)
    folder = layout.resolve("x", root)
    path = folder / "embeddings" / "caption_owner.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    for args in (("remove", "x", "--id", "anything"), ("add", "x", str(corpora[1]), *QUIET)):
        out = run(root, *args, code=1).output
        assert "embeddings/caption_owner.npy does not match its checksum" in out
        assert (root / "x").resolve() == folder


@pytest.mark.parametrize("rel", ["image.faiss", "caption.faiss", "embeddings/image.qbnorm.npy"])
def test_repair_rebuilds_derived_files_without_the_model(built, tmp_path, rel):
    root = fresh(built, tmp_path)
    before = run(root, "search", "x", "--text", "a blue circle", "--json").output
    folder = layout.resolve("x", root)
    normalisers = np.load(folder / "embeddings/image.qbnorm.npy")
    damage(folder, rel, "delete")
    out = run(root, "verify", "x", "--repair", "--sample", "0").output
    assert f"rebuilt {rel}" in out and "verified: all checks passed" in out
    repaired = layout.resolve("x", root)
    assert repaired != folder and not (repaired / rel).is_symlink()
    assert read_manifest(repaired).history[-1].op == "repair"
    if rel.endswith("qbnorm.npy"):  # against the live corpus, as `add` normalises
        np.testing.assert_allclose(np.load(repaired / rel), normalisers, rtol=0, atol=0.5)
    else:  # the same vectors, the same ids: the same answers
        after = run(root, "search", "x", "--text", "a blue circle", "--json").output
        assert _ids(after) == _ids(before)


def _ids(output: str) -> list[str]:
    import json

    return [r["id"] for r in json.loads(output)["results"]]


@pytest.mark.parametrize("rel", ["embeddings/image.npy", "meta.lmdb/data.mdb", MANIFEST])
def test_primary_data_is_not_repaired_but_rolled_back(built, tmp_path, rel):
    root = fresh(built, tmp_path)
    folder = layout.resolve("x", root)
    damage(folder, rel, "truncate")
    if rel != MANIFEST:
        out = run(root, "verify", "x", "--repair", code=1).output
        assert "primary data" in out and "--rollback" in out and "--resume" in out
        assert layout.resolve("x", root) == folder  # nothing published
    out = run(root, "verify", "x", "--rollback", "--sample", "0").output
    assert "previous version" in out and "verified: all checks passed" in out
    assert read_manifest(layout.resolve("x", root)).history == ()  # the build, before the add
    run(root, "search", "x", "--text", "a red square")


def test_rollback_without_a_sound_previous_version_says_so(corpora, tmp_path):
    root = tmp_path / "indexes"
    run(root, "build", str(corpora[1]), "--name", "y", *TINY, *QUIET)
    damage(layout.resolve("y", root), "embeddings/image.npy", "delete")
    out = run(root, "verify", "y", "--rollback", code=1).output
    assert "no previous version that verifies" in out and "--resume" in out
    out = run(root, "verify", "y", "--sample", "0", code=1).output
    assert "embeddings/image.npy is missing" in out and "--repair" in out


def test_repairing_one_normaliser_keeps_the_other_bit_for_bit(built, tmp_path):
    root = fresh(built, tmp_path)
    folder = layout.resolve("x", root)
    sound = (folder / "embeddings/caption.qbnorm.npy").read_bytes()
    damage(folder, "embeddings/image.qbnorm.npy", "truncate")
    out = run(root, "verify", "x", "--repair", "--sample", "0").output
    assert "rebuilt embeddings/image.qbnorm.npy" in out and "as it is now" in out
    repaired = layout.resolve("x", root)
    assert (repaired / "embeddings/caption.qbnorm.npy").read_bytes() == sound


def test_a_missing_version_folder_is_damage_with_a_way_back(built, tmp_path):
    root = fresh(built, tmp_path)
    shutil.rmtree(layout.resolve("x", root))
    out = run(root, "search", "x", "--text", "red", code=1).output
    assert "version folder itself is missing" in out and "--rollback" in out
    assert "previous version" in run(root, "verify", "x", "--rollback", "--sample", "0").output


def test_a_server_stays_on_the_sound_version_when_a_damaged_one_is_published(built, tmp_path):
    from retrieval.query.search import Searcher

    root = fresh(built, tmp_path)
    with Searcher.open("x", root) as searcher:
        old = searcher.folder
        newer = old.parent / "newer"
        shutil.copytree(old, newer)
        (newer / MANIFEST).write_text("{not json")
        (root / "x").unlink()
        (root / "x").symlink_to(newer.relative_to(root))
        assert searcher.latest() is searcher  # a warning, and the version that is whole
