from __future__ import annotations

import pytest

from retrieval.corpus.filters import matches_all, parse
from retrieval.errors import SearchError


@pytest.mark.parametrize(
    ("cond", "extra", "want"),
    [
        ("split=val2017", {"split": "val2017"}, True),
        ("split=val2017", {"split": "train2017"}, False),
        ("split!=val2017", {"split": "train2017"}, True),
        ("colours=red", {"colours": ["blue", "red"]}, True),
        ("year>=2020", {"year": 2020}, True),
        ("year>2020", {"year": "2020"}, False),
        ("year<2020", {"year": "n/a"}, False),
        ("score=0.5..1", {"score": 0.75}, True),
        ("score=0.5..1", {"score": 1.5}, False),
        ("missing=1", {}, False),
    ],
)
def test_conditions(cond, extra, want):
    assert matches_all((parse(cond),), extra) is want


@pytest.mark.parametrize("bad", ["nokey", "a>=x", "a=1..x", "=3", "a="])
def test_bad_conditions_are_clear(bad):
    with pytest.raises(SearchError, match="bad"):
        parse(bad)
