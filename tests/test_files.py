"""Durable writes (`retrieval.files`) and the writers built on them: spool shards, pixel cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from retrieval.files import atomic_path, atomic_write, sha256_file
from retrieval.model import spool
from retrieval.train import pixel_cache


class Boom(Exception):
    pass


def test_atomic_write_replaces_the_target_whole(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old content, longer than the new one")
    with atomic_write(target) as f:
        f.write(b"new")
        assert target.read_bytes().startswith(b"old")  # untouched until the block ends
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_atomic_write_creates_a_missing_target(tmp_path):
    with atomic_write(tmp_path / "new.txt", "w") as f:
        f.write("hello")
    assert (tmp_path / "new.txt").read_text() == "hello"


@pytest.mark.parametrize("where", ["atomic_write", "atomic_path"])
def test_an_error_in_the_block_keeps_the_old_file_and_leaves_no_temp(tmp_path, where):
    target = tmp_path / "keep.json"
    target.write_text('{"v": 1}')
    with pytest.raises(Boom):
        if where == "atomic_write":
            with atomic_write(target, "w") as f:
                f.write('{"v": 2, "torn')
                raise Boom
        else:
            with atomic_path(target) as tmp:
                tmp.write_text('{"v": 2, "torn')
                raise Boom
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_an_error_before_the_temp_exists_is_passed_on(tmp_path):
    with pytest.raises(Boom), atomic_path(tmp_path / "never") as tmp:
        assert not tmp.exists()
        raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_text_mode_uses_the_encoding(tmp_path):
    target = tmp_path / "text.txt"
    with atomic_write(target, "w", encoding="latin-1") as f:
        f.write("café")
    assert target.read_bytes() == "café".encode("latin-1")
    with atomic_write(target, "w", encoding="utf-8", newline="\r\n") as f:
        f.write("a\nb")
    assert target.read_bytes() == b"a\r\nb"


def test_temp_names_sit_beside_the_target_end_in_tmp_and_are_found_by_a_cleaner(tmp_path):
    target = tmp_path / "shard-000001.npz"
    names = []
    for _ in range(2):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            assert tmp.parent == tmp_path and tmp.name.endswith(".tmp")
            assert target.name in tmp.name and tmp != target
            assert list(tmp_path.glob("*.tmp")) == [tmp]  # pathlib's * matches ".name"
            names.append(tmp.name)
    assert names[0] != names[1]  # two writers of one target do not share a temp
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_sha256_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256_file(path, chunk=2) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_spool_shard_round_trips_and_leaves_no_temp(tmp_path):
    shard = {
        "image_emb": np.eye(3, 4, dtype=np.float32),
        "positions": np.array([0, 2, 3], np.int64),
        "caption_emb": np.ones((2, 4), np.float32),
        "failures": {1: "unreadable"},
    }
    path = tmp_path / "shard-000000.npz"
    spool._write(path, shard, "fp")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    back = spool._read(path, "fp")
    assert back["failures"] == {1: "unreadable"}
    for k in ("image_emb", "positions", "caption_emb"):
        np.testing.assert_array_equal(back[k], shard[k])
    assert spool._read(path, "another") is None


def test_spool_resume_drops_the_temps_of_interrupted_writes(tmp_path):
    folder, key = tmp_path / "spool", {"model": "m", "batch_size": 4}
    spool._prepare(folder, key, resume=False)
    (folder / "shard-000000.npz").write_bytes(b"kept")
    (folder / ".shard-000001.npz.0123abcd.tmp").write_bytes(b"torn")  # retrieval.files' name
    (folder / "shard-000002.npz.tmp").write_bytes(b"torn")  # an earlier version's name
    spool._prepare(folder, key, resume=True)
    assert sorted(p.name for p in folder.iterdir()) == ["shard-000000.npz", spool.KEY]
    assert json.loads((folder / spool.KEY).read_text()) == key


def test_pixel_cache_is_written_whole_and_reused(tmp_path):
    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (12, 8), colour).save(paths[-1])
    paths.append(tmp_path / "missing.png")
    cache = tmp_path / "cache"
    cache.mkdir()
    key = pixel_cache._fingerprint(paths, 6)
    stale = cache / f".pixels-{key}.npy.deadbeef.tmp"  # what a killed decode leaves
    stale.write_bytes(b"\0" * 64)
    pixels, failures = pixel_cache.load_or_build(paths, 6, cache)
    assert pixels.shape == (4, 6, 6, 3) and pixels.dtype == np.uint8
    assert list(failures) == [3]
    assert pixels[0, 3, 3].tolist() == [255, 0, 0] and pixels[2, 3, 3].tolist() == [0, 0, 255]
    assert sorted(p.name for p in cache.iterdir()) == [f"pixels-{key}.json", f"pixels-{key}.npy"]
    again, failures_again = pixel_cache.load_or_build(paths, 6, cache)
    assert failures_again == failures
    np.testing.assert_array_equal(again, pixels)
