from __future__ import annotations

import pytest

from retrieval.store import ItemEntry, Store


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
        assert store.counts() == {"items": 2, "captions": 2}
        assert store.meta("k") == {"v": 1}
        assert [i["id"] for i in store.iter_items()] == ["cat/1", "dög"]


def test_open_refuses_a_folder_without_a_store(tmp_path):
    with pytest.raises(FileNotFoundError):
        Store.open(tmp_path)
