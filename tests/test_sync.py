"""Folder sync (#30 item 1): `retrieval sync` brings an index in step with its corpus in one
version: new files added, edited ones re-encoded, deleted ones removed, nothing lost or twice."""

from __future__ import annotations

import os

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_image

from retrieval.cli import main
from retrieval.index import layout
from retrieval.index.manifest import read_manifest
from retrieval.index.store import Store
from retrieval.index.verify import verify

TINY = ("--model", "tiny-vit", "--random-init")
QUIET = ("--no-progress", "--workers", "0")
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def run(root, *args, code=0):
    result = CliRunner().invoke(main, [*map(str, args), "--index-dir", str(root)])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    for name, colour in COLOURS.items():
        write_image(folder / f"{name}.png", colour=colour)
        (folder / f"{name}.txt").write_text(f"a {name} square\n")
    return folder


def state(root):
    """Id -> (caption texts, image vector) of the published version."""
    folder = layout.resolve("p", root)
    image = np.load(folder / "embeddings" / "image.npy")
    with Store.open(folder / layout.STORE) as store:
        return {
            it["id"]: ([c["text"] for c in it["captions"]], image[it["row"]].copy())
            for it in store.iter_items()
        }


def test_sync_follows_adds_edits_deletes_renames_and_caption_edits(photos, tmp_path):
    root = tmp_path / "ix"
    run(root, "build", photos, "--name", "p", *TINY, *QUIET)
    before = state(root)
    assert "new      0\nchanged  0\ngone     0" in run(root, "sync", "p", "--dry-run")
    write_image(photos / "white.png", colour=(250, 250, 250))  # added
    write_image(photos / "red.png", colour=(10, 10, 10))  # edited in place
    (photos / "green.txt").write_text("a green square, edited\n")  # caption edit
    (photos / "blue.png").rename(photos / "navy.png")  # renamed: one gone, one new
    (photos / "blue.txt").rename(photos / "navy.txt")
    os.utime(photos / "navy.png")
    planned = run(root, "sync", "p", "--dry-run")
    assert "new      2: navy, white" in planned or "new      2: white, navy" in planned
    assert "changed  2: green, red" in planned and "gone     1: blue" in planned
    assert state(root).keys() == before.keys()  # a dry run changes nothing
    out = run(root, "sync", "p", *QUIET)
    assert "added 2, re-encoded 2, removed 1" in out
    after = state(root)
    assert sorted(after) == ["green", "navy", "red", "white"]
    assert after["green"][0] == ["a green square, edited"]
    assert not np.array_equal(after["red"][1], before["red"][1])  # the new pixels
    np.testing.assert_array_equal(after["navy"][1], before["blue"][1])  # same pixels, new id
    assert read_manifest(layout.resolve("p", root)).history[-1].op == "sync"
    assert verify("p", root, sample=0).ok
    # Again: nothing to do, and a touched but unedited file is no change.
    os.utime(photos / "red.png")
    assert "new      0\nchanged  0\ngone     0" in run(root, "sync", "p", "--dry-run")
    assert "added 0, re-encoded 0, removed 0" in run(root, "sync", "p", *QUIET)


def test_sync_of_a_caption_file_and_a_corpus_named_explicitly(tmp_path):
    images = tmp_path / "images"
    rows = []
    for name, colour in COLOURS.items():
        write_image(images / f"{name}.png", colour=colour)
        rows.append(f'{{"id": "{name}", "image": "images/{name}.png", "caption": "a {name}"}}')
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(rows) + "\n")
    root = tmp_path / "ix"
    run(root, "build", corpus, "--name", "p", *TINY, *QUIET)
    moved = tmp_path / "d.jsonl"
    moved.write_text("\n".join(rows[:2]).replace("a red", "a crimson") + "\n")
    out = run(root, "sync", "p", moved, *QUIET)
    assert "added 0, re-encoded 1, removed 1" in out
    assert sorted(state(root)) == ["green", "red"] and state(root)["red"][0] == ["a crimson"]


def test_sync_against_an_empty_corpus_removes_nothing(photos, tmp_path):
    root = tmp_path / "ix"
    run(root, "build", photos, "--name", "p", *TINY, *QUIET)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = run(root, "sync", "p", empty, *QUIET, code=1)
    assert "lists no items: sync would remove all of index 'p'" in out
    assert sorted(state(root)) == ["blue", "green", "red"]
