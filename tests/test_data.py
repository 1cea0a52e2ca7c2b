from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_image, write_jsonl

from retrieval.corpus.readers import detect_format, read_corpus
from retrieval.corpus.records import ReadOptions
from retrieval.errors import CorpusError


def test_folder_tree_with_sidecar_captions(tmp_path):
    write_image(tmp_path / "a" / "cat.jpg")
    (tmp_path / "a" / "cat.txt").write_text("a cat\n\n  a small cat  \n")
    write_image(tmp_path / "dog.png")
    (tmp_path / "notes.txt").write_text("not a caption of anything")
    records = list(read_corpus(tmp_path))
    assert [r.id for r in records] == ["a/cat", "dog"]
    assert records[0].captions == ("a cat", "a small cat")
    assert records[1].captions == ()
    assert detect_format(tmp_path) == "folder"


def test_csv_groups_captions_by_image_and_keeps_extra_columns(tmp_path):
    write_image(tmp_path / "img" / "x.jpg")
    (tmp_path / "c.csv").write_text(
        "filepath,title,source\nimg/x.jpg,first,web\nimg/x.jpg,second,web\nimg/y.jpg,other,\n"
    )
    records = list(read_corpus(tmp_path / "c.csv"))
    assert [(r.id, r.captions) for r in records] == [
        ("img/x", ("first", "second")),
        ("img/y", ("other",)),
    ]
    assert records[0].image == tmp_path / "img" / "x.jpg"
    assert records[0].extra == {"source": "web"}


def test_malformed_csv_rows_are_reported_and_the_rows_after_them_still_read(tmp_path):
    text = (
        "\ufefffilepath,title\n"  # Excel's byte-order mark
        "a.jpg,fine\n"
        "b.jpg,a dog, running\n"  # unquoted comma
        '"m.jpg","two\nlines"\n'  # a legitimate multi-line caption
        "\n"
        'c.jpg,"never closed\n'
        "d.jpg,after it\n"
        'e.jpg,"Stop" sign,\n'  # lenient quoting and a trailing comma, as csv always read them
        ",,\n   \n"  # empty rows, as spreadsheets write them
        ",a caption without its image\n"
    )
    (tmp_path / "c.csv").write_text(text, encoding="utf-8")
    records = list(read_corpus(tmp_path / "c.csv"))
    problems = {r.id: r.problem for r in records if r.problem}
    assert problems.keys() == {"c.csv:3", "c.csv:7", "c.csv:12"}
    assert problems["c.csv:12"] == "no 'filepath' value"
    assert "3 fields where the header has 2" in problems["c.csv:3"]
    assert "a quote is never closed" in problems["c.csv:7"]
    good = {r.id: r.captions for r in records if not r.problem}
    assert good == {"a": ("fine",), "m": ("two\nlines",), "d": ("after it",), "e": ("Stop sign",)}


def test_paths_are_absolute_whatever_the_working_folder(tmp_path, monkeypatch):
    write_image(tmp_path / "data" / "img" / "x.jpg")
    (tmp_path / "data" / "c.csv").write_text("filepath,title\nimg/x.jpg,a\n")
    write_jsonl(tmp_path / "data" / "c.jsonl", [{"image": "x.jpg", "caption": "a"}])
    monkeypatch.chdir(tmp_path)
    [csv_record] = read_corpus("data/c.csv")
    [jsonl_record] = read_corpus("data/c.jsonl", ReadOptions(image_root=Path("data/img")))
    [folder_record] = read_corpus("data/img")
    want = tmp_path / "data" / "img" / "x.jpg"
    assert csv_record.image == jsonl_record.image == folder_record.image == want
    assert want.is_absolute() and folder_record.id == "x"


def test_tsv_with_custom_columns_and_id(tmp_path):
    (tmp_path / "c.tsv").write_text("key\tpic\ttext\nk1\ta.jpg\thello\nk1\ta.jpg\tworld\n")
    opts = ReadOptions(image_col="pic", caption_col="text", id_col="key")
    [record] = read_corpus(tmp_path / "c.tsv", opts)
    assert record.id == "k1" and record.captions == ("hello", "world")


def test_csv_missing_column_is_a_clear_error(tmp_path):
    (tmp_path / "c.csv").write_text("path,caption\na.jpg,x\n")
    with pytest.raises(CorpusError, match="no column 'filepath'.*--image-col"):
        list(read_corpus(tmp_path / "c.csv"))


def test_jsonl_caption_or_captions_id_and_metadata(tmp_path):
    write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"image": "a.jpg", "caption": "one", "id": 7, "year": 2020},
            {"image": "sub/b.jpg", "captions": ["two", "three"]},
            {"image": "c.jpg", "captions": [1, None, "ok", {"a": 1}, True]},
            {"image": "d.jpg", "caption": 42},
        ],
    )
    (tmp_path / "c.jsonl").write_text((tmp_path / "c.jsonl").read_text() + "{broken\n")
    records = list(read_corpus(tmp_path / "c.jsonl"))
    assert [r.id for r in records[:2]] == ["7", "sub/b"]
    assert records[0].extra == {"year": 2020}
    assert records[1].captions == ("two", "three")
    assert records[2].captions == ("1", "", "ok", "", "")  # empty ones: skipped, with a reason
    assert records[3].captions == ("42",)
    assert records[4].problem == "malformed record"


def test_json_list_like_coco_mini_finds_images_folder(tmp_path):
    write_image(tmp_path / "images" / "p.jpg")
    (tmp_path / "captions.json").write_text(
        json.dumps([{"image": "p.jpg", "captions": ["a photo"], "split": "val"}])
    )
    [record] = read_corpus(tmp_path / "captions.json")
    assert record.image == tmp_path / "images" / "p.jpg"
    assert record.extra == {"split": "val"}


def test_coco_captions(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "1.jpg", "height": 10}, {"id": 2, "file_name": "2.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "a"},
            {"id": 11, "image_id": 1, "caption": "b"},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    root = tmp_path / "elsewhere"
    records = list(read_corpus(tmp_path / "ann.json", ReadOptions(image_root=root)))
    assert [(r.id, r.captions) for r in records] == [("1", ("a", "b")), ("2", ())]
    assert records[0].image == root / "1.jpg"
    assert detect_format(tmp_path / "ann.json") == "coco"


def test_a_folder_beside_its_annotation_file_asks_which_is_meant(tmp_path):
    write_image(tmp_path / "images" / "a.jpg")
    write_jsonl(tmp_path / "corpus.jsonl", [{"image": "images/a.jpg", "caption": "x"}])
    with pytest.raises(CorpusError, match="holds corpus.jsonl: give that file.*--format folder"):
        list(read_corpus(tmp_path))
    [record] = read_corpus(tmp_path, ReadOptions(format="folder"))
    assert record.id == "images/a" and record.captions == ()
    # Per-image sidecars and img2dataset's stats files are not corpus files.
    shots = tmp_path / "shots"
    write_image(shots / "x.jpg")
    write_image(shots / "y.png")
    for name in ("x.json", "y.png.json", "00000_stats.json"):
        (shots / name).write_text("{}")
    assert [r.id for r in read_corpus(shots)] == ["x", "y"]


def test_unknown_format_and_missing_corpus(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(CorpusError, match="cannot tell the corpus format"):
        list(read_corpus(tmp_path / "x.parquet"))
    with pytest.raises(CorpusError, match="not found"):
        list(read_corpus(tmp_path / "nope.csv"))


def test_karpathy_split_file(tmp_path):
    data = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "a.jpg",
                "split": "test",
                "cocoid": 42,
                "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}, {"tokens": ["a", "cat"]}],
            },
            {
                "filepath": "train2014",
                "filename": "b.jpg",
                "split": "train",
                "cocoid": 43,
                "sentences": [{"raw": "x"}],
            },
        ],
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    assert detect_format(tmp_path / "dataset_coco.json") == "karpathy"
    [record] = read_corpus(tmp_path / "dataset_coco.json", ReadOptions(split="test"))
    assert record.id == "42" and record.captions == ("A dog.", "a cat")
    assert record.image == tmp_path / "val2014" / "a.jpg"
    assert len(list(read_corpus(tmp_path / "dataset_coco.json"))) == 2


def test_flickr8k_token_file_with_split(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text(
        "1000_a.jpg#0\tA child .\n1000_a.jpg#1\tA kid .\n2000_b.jpg#0\tA dog .\n"
    )
    (tmp_path / "test.txt").write_text("2000_b.jpg\n")
    assert detect_format(tmp_path / "Flickr8k.token.txt") == "flickr8k"
    records = list(read_corpus(tmp_path / "Flickr8k.token.txt"))
    assert [(r.id, r.captions) for r in records] == [
        ("1000_a", ("A child .", "A kid .")),
        ("2000_b", ("A dog .",)),
    ]
    opts = ReadOptions(split_file=tmp_path / "test.txt")
    assert [r.id for r in read_corpus(tmp_path / "Flickr8k.token.txt", opts)] == ["2000_b"]
    # A line that is not "image#n<TAB>caption" is reported, with its line number.
    with (tmp_path / "Flickr8k.token.txt").open("a") as f:
        f.write("3000_c.jpg#0 spaces not a tab\n\n")
    bad = [r for r in read_corpus(tmp_path / "Flickr8k.token.txt") if r.problem]
    assert [(r.id, r.problem) for r in bad] == [
        ("Flickr8k.token.txt:4", "not an 'image.jpg#n<TAB>caption' line")
    ]


def test_split_filters_any_format_with_a_split_field(tmp_path):
    write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"image": "a.jpg", "caption": "x", "split": "train"},
            {"image": "b.jpg", "caption": "y", "split": "test"},
        ],
    )
    records = list(read_corpus(tmp_path / "c.jsonl", ReadOptions(split="test")))
    assert [r.id for r in records] == ["b"]
