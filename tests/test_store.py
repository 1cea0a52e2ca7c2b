from __future__ import annotations

import pytest

from retrieval.index.store import ItemEntry, Store


def test_items_captions_and_row_maps_roundtrip(tmp_path):
    with Store.create(tmp_path / "db") as store:
        store.put_items(
            [
                ItemEntry(
                    "cat/1",
                    0,
                    "/x/1.jpg",
                    (("cat/1#0", 0, "a cat"), ("cat/1#1", 1, "chat")),
                    {"year": 2020, "tags": ["pet"]},
                ),
                ItemEntry("dög", 1, "/x/2.jpg"),
            ]
        )
        store.put_meta("k", {"v": 1})
    with Store.open(tmp_path / "db") as store:
        assert store.item("cat/1") == {
            "id": "cat/1",
            "row": 0,
            "path": "/x/1.jpg",
            "captions": [{"id": "cat/1#0", "text": "a cat"}, {"id": "cat/1#1", "text": "chat"}],
            "extra": {"year": 2020, "tags": ["pet"]},
        }
        assert store.caption("cat/1#1") == {
            "id": "cat/1#1",
            "row": 1,
            "item": "cat/1",
            "text": "chat",
        }
        assert store.item_ids([1, 0, 7]) == ["dög", "cat/1", None]
        assert store.caption_ids([1]) == ["cat/1#1"]
        assert store.item("missing") is None
        assert store.counts() == {
            "items": 2,
            "captions": 2,
            "image_tombstones": 0,
            "caption_tombstones": 0,
        }
        assert store.meta("k") == {"v": 1}
        assert [i["id"] for i in store.iter_items()] == ["cat/1", "dög"]


def test_open_refuses_a_folder_without_a_store(tmp_path):
    with pytest.raises(FileNotFoundError):
        Store.open(tmp_path)


def test_remove_items_frees_rows_and_tombstones_are_kept_apart(tmp_path):
    items = [
        ItemEntry("a", 0, "/a", (("a#0", 0, "x"), ("a#1", 1, "y"))),
        ItemEntry("b", 1, "/b", (("b#0", 2, "z"),)),
        ItemEntry("c", 2, "/c"),
    ]
    with Store.create(tmp_path / "db") as store:
        store.put_items(items)
        store.copy_to(tmp_path / "copy")
        assert store.remove_items(["a", "missing"]) == ([0], [0, 1])
    with Store.create(tmp_path / "copy") as copy:
        assert copy.remove_items(["b", "c"]) == ([1, 2], [2])
        copy.add_tombstones("image", [1, 2])
        copy.add_tombstones("caption", [2])
    with Store.open(tmp_path / "db") as store:
        assert store.item("a") is None and store.caption("a#1") is None
        assert store.rows("image").tolist() == [1, 2]
        assert store.rows("caption").tolist() == [2]
        assert store.tombstones("image").tolist() == []
    with Store.open(tmp_path / "copy") as copy:
        assert [i["id"] for i in copy.iter_items()] == ["a"]
        assert copy.tombstones("image").tolist() == [1, 2]
        assert copy.tombstones("caption").tolist() == [2]
        assert copy.item_ids([0, 1]) == ["a", None]
        assert copy.counts()["image_tombstones"] == 2
