from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.corpus import synthetic


def test_generation_is_deterministic_and_prefix_stable(tmp_path):
    a = synthetic.generate(tmp_path / "a", n=6, seed=1)
    b = synthetic.generate(tmp_path / "b", n=9, seed=1)
    rows_a = [json.loads(x) for x in a.read_text().splitlines()]
    rows_b = [json.loads(x) for x in b.read_text().splitlines()]
    assert rows_a == rows_b[:6]
    for i in range(6):
        pa = (tmp_path / "a" / rows_a[i]["image"]).read_bytes()
        assert pa == (tmp_path / "b" / rows_b[i]["image"]).read_bytes()
    c = synthetic.generate(tmp_path / "c", n=6, seed=2)
    assert c.read_text() != a.read_text()


def test_every_image_has_several_phrasings_of_one_scene(tmp_path):
    rows = [json.loads(x) for x in synthetic.generate(tmp_path, n=30).read_text().splitlines()]
    for row in rows:
        assert len(set(row["captions"])) >= 2
        _a, rel, _b = row["scene"].split("|")
        assert rel in ("left of", "above")
    caps = synthetic.Scene("red", "circle", "left of", "blue", "square").captions()
    assert "a red circle left of a blue square" in caps
    assert "a blue square with a red circle on its left" in caps


def test_scene_key_is_the_same_for_converse_relations():
    left = synthetic.Scene("red", "circle", "left of", "blue", "square")
    right = synthetic.Scene("blue", "square", "right of", "red", "circle")
    assert left.key == right.key


def test_relation_is_visible_in_the_pixels():
    rng = np.random.default_rng(0)
    scene = synthetic.Scene("red", "square", "left of", "blue", "square")
    px = np.asarray(synthetic.render(scene, 64, rng)).astype(int)
    red = np.argwhere((px[..., 0] > 180) & (px[..., 2] < 80))
    blue = np.argwhere((px[..., 2] > 180) & (px[..., 0] < 80))
    assert red[:, 1].mean() < blue[:, 1].mean()


def test_twins_swap_the_shapes_of_the_previous_scene(tmp_path):
    from retrieval.corpus.readers import read_corpus

    records = list(read_corpus(synthetic.generate(tmp_path, n=6, seed=4, twins=True)))
    for even, odd in zip(records[::2], records[1::2], strict=True):
        a, rel, b = even.extra["scene"].split("|")
        assert odd.extra["scene"] == f"{b}|{rel}|{a}"
        assert even.extra["pair"] == odd.extra["pair"]
    assert len({r.extra["pair"] for r in records}) == 3


def test_part_captions_say_where_each_shape_is(tmp_path):
    from retrieval.corpus.readers import read_corpus

    (r,) = read_corpus(synthetic.generate(tmp_path, n=1, seed=2, parts=True))
    a, rel, b = r.extra["scene"].split("|")
    assert len(r.captions) == 5
    where = {"left of": ("on the left", "on the right"), "above": ("at the top", "at the bottom")}
    assert sorted(r.captions[3:]) == sorted(
        [f"{_a(a)} {where[rel][0]}", f"{_a(b)} {where[rel][1]}"]
    )


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def test_relations_restrict_the_scenes_drawn(tmp_path):
    corpus = synthetic.generate(tmp_path, n=40, seed=3, relations=("left of", "above"))
    rows = [json.loads(x) for x in corpus.read_text().splitlines()]
    assert {row["relation"] for row in rows} == {"left of", "above"}
    with pytest.raises(ValueError, match="beside"):
        synthetic.generate(tmp_path / "bad", n=2, relations=("beside",))
