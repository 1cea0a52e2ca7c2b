"""Inputs that used to be mishandled (#20 item 5), each refused, reported or read as meant."""

from __future__ import annotations

import json

from click.testing import CliRunner
from conftest import write_image, write_jsonl

from retrieval.cli import main
from retrieval.cli.search import results_table
from retrieval.corpus.readers import read_corpus
from retrieval.serve.app import readable_size

TINY = ("--model", "tiny-vit", "--random-init")
QUIET = ("--no-progress", "--workers", "0")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_grid_into_a_missing_folder_fails_before_the_search(tmp_path):
    corpus = write_jsonl(
        tmp_path / "c.jsonl", [{"image": str(write_image(tmp_path / "a.png")), "caption": "red"}]
    )
    ix = tmp_path / "ix"
    assert invoke("build", corpus, "--name", "g", *TINY, *QUIET, "--index-dir", ix).exit_code == 0
    out = invoke(
        "search", "g", "--text", "red", "--grid", tmp_path / "nope/s.png", "--index-dir", ix
    )
    assert out.exit_code == 2 and "rank" not in out.output  # no table: the search never ran
    assert "the folder" in out.output and "nope" in out.output and "does not exist" in out.output


def test_upload_limits_are_given_in_the_unit_that_shows_them():
    assert readable_size(200_000) == "195 KB"
    assert readable_size(10 * 2**20) == "10 MB" and readable_size(int(1.5 * 2**20)) == "1.5 MB"
    assert readable_size(512) == "512 bytes"


def test_captions_with_line_breaks_keep_the_table_one_line_a_result(tmp_path):
    image = write_image(tmp_path / "a.png")
    table = tmp_path / "c.csv"
    # RFC 4180: a quoted field may hold line breaks (and doubled quotes).
    table.write_text(f'filepath,title\n{image},"a red\nsquare, ""big"""\n', newline="")
    [record] = list(read_corpus(table))
    assert record.captions == ('a red\nsquare, "big"',)
    out = {"results": [{"rank": 1, "score": 0.5, "id": "a\nb", "captions": list(record.captions)}]}
    lines = results_table(out).splitlines()
    assert len(lines) == 2 and 'a red\\nsquare, "big"' in lines[1] and "a\\nb" in lines[1]


def test_folder_sidecar_json_is_the_items_metadata(tmp_path):
    folder = tmp_path / "photos"
    for name in ("a", "b", "c", "d"):
        write_image(folder / f"{name}.jpg", fmt="JPEG")
    (folder / "a.txt").write_text("a red square\n")
    (folder / "a.json").write_text(json.dumps({"year": 2021, "caption": "ignored: a .txt wins"}))
    (folder / "b.jpg.json").write_text(json.dumps({"caption": "from the json", "place": "Oslo"}))
    (folder / "c.json").write_text("[1, 2]")
    records = {r.id: r for r in read_corpus(folder)}
    assert records["a"].captions == ("a red square",) and records["a"].extra == {"year": 2021}
    assert records["b"].captions == ("from the json",) and records["b"].extra == {"place": "Oslo"}
    assert records["c"].problem == "c.json is not a JSON object"
    assert records["d"].extra == {} and not records["d"].problem


def test_val_records_left_out_are_reported(tmp_path):
    rows = [
        {"id": f"r{i}", "image": str(write_image(tmp_path / f"{i}.png", colour=(i * 20, 0, 0))),
         "caption": f"shade {i}"}
        for i in range(8)
    ]  # fmt: skip
    train = write_jsonl(tmp_path / "train.jsonl", rows[:6])
    val = write_jsonl(tmp_path / "val.jsonl", [rows[6], rows[7], {**rows[7], "caption": "again"}])
    out = tmp_path / "run"
    args = ["train", train, "--out", out, "--val", val, "--epochs", "1", "--batch-size", "4"]
    result = invoke(*args, *TINY, *QUIET)
    assert result.exit_code == 0, result.output
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], s.get("set")) for s in skipped] == [("r7", "validation")]
