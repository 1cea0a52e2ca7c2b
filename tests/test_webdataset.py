"""WebDataset tar shards as a corpus: reading, member references, build, search, CLI, verify."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from retrieval.cli import main
from retrieval.corpus import webdataset
from retrieval.corpus.images import BadImage, load_image
from retrieval.corpus.readers import detect_format, read_corpus
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.index.verify import verify
from retrieval.query.search import Query, Searcher
from retrieval.serve.app import create_app

QUIET = BuildConfig(progress=False, workers=0)
COLOURS = {
    "000000001": (220, 20, 20),
    "000000002": (20, 200, 20),
    "000000004": (20, 20, 220),
    "000000006": (230, 220, 20),
    "000000007": (200, 20, 200),
}
IDS = ["000000001", "000000002", "000000003", "000000004", "000000005", "000000006", "000000007"]
GOOD = [i for i in IDS if i in COLOURS]


def encoded(key: str, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), COLOURS[key]).save(buf, format=fmt, **save)
    return buf.getvalue()


def meta(key: str, **fields) -> bytes:
    """An img2dataset-style metadata member."""
    obj = {"url": f"http://example.com/{key}", "key": key, "width": 32, "height": 24}
    return json.dumps({**obj, "status": "success", **fields}).encode()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def make_shards(folder: Path) -> dict[str, bytes]:
    """Three shards as img2dataset lays them out; returns the image bytes by member name."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        "000000001.jpg": encoded("000000001", "JPEG", quality=95),
        "000000002.png": encoded("000000002", "PNG"),
        "000000004.png": encoded("000000004", "PNG"),
        "000000005.jpg": encoded("000000001", "JPEG")[:200],  # cut short: a corrupt member
        "000000006.jpeg": encoded("000000006", "JPEG", quality=95),
        "000000007.webp": encoded("000000007", "WEBP", lossless=True),
    }
    write_shard(
        folder / "00000.tar",
        [
            ("000000001.jpg", images["000000001.jpg"]),
            ("000000001.txt", b"a red square\n\n  bright red  \n"),
            ("000000001.json", meta("000000001", caption="not used: the txt wins")),
            ("000000002.png", images["000000002.png"]),  # caption only in the json
            ("000000002.json", meta("000000002", caption="a green square")),
            ("000000003.txt", b"a sample whose download failed"),  # no image
            ("000000003.json", meta("000000003", status="failed_to_download")),
        ],
    )
    write_shard(
        folder / "00001.tar",
        [
            ("000000004.png", images["000000004.png"]),
            ("000000004.txt", b"a blue square"),
            ("000000005.jpg", images["000000005.jpg"]),
            ("000000005.txt", b"broken"),
            ("000000006.jpeg", images["000000006.jpeg"]),
            ("000000006.txt", b"a yellow square\nsunny\n"),
        ],
    )
    write_shard(
        folder / "00002.tar",
        [("000000007.webp", images["000000007.webp"]), ("000000007.txt", b"a magenta square")],
    )
    # img2dataset's other outputs sit beside the shards and are not samples.
    (folder / "00000_stats.json").write_text("{}")
    (folder / "00000.parquet").write_bytes(b"PAR1")
    return images


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("wds") / "shards"
    return folder, make_shards(folder)


@pytest.fixture(scope="module")
def built(tmp_path_factory, shards, encoder):
    root = tmp_path_factory.mktemp("indexes")
    report = build(shards[0], "wds", QUIET, index_dir=root, encoder=encoder)
    return report, root


def by_id(records) -> dict:
    return {r.id: r for r in records}


def test_a_folder_of_shards_reads_as_records_in_order(shards):
    folder, images = shards
    assert detect_format(folder) == "webdataset"
    assert detect_format(folder / "00001.tar") == "webdataset"
    records = list(read_corpus(folder))
    assert [r.id for r in records] == IDS
    got = by_id(records)
    assert got["000000001"].captions == ("a red square", "bright red")
    assert got["000000001"].extra == {
        "url": "http://example.com/000000001",
        "key": "000000001",
        "width": 32,
        "height": 24,
        "status": "success",
    }
    assert got["000000002"].captions == ("a green square",)
    assert got["000000006"].captions == ("a yellow square", "sunny")
    assert got["000000003"].problem == "no image in sample"
    assert [r.id for r in records if r.problem] == ["000000003"]
    member = webdataset.parse_reference(got["000000004"].image)
    assert member is not None
    assert member.tar == (folder / "00001.tar").resolve()
    assert member.name == "000000004.png"
    assert webdataset.member_bytes(got["000000004"].image) == images["000000004.png"]
    assert webdataset.backing_file(got["000000004"].image) == member.tar


def test_a_folder_with_images_beside_a_tar_stays_a_folder_corpus(tmp_path):
    write_shard(tmp_path / "backup.tar", [("x.txt", b"x")])
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    assert detect_format(tmp_path) == "folder"


def test_load_image_decodes_a_member_reference(shards):
    records = by_id(read_corpus(shards[0]))
    for key in ("000000002", "000000004", "000000007"):  # lossless: exact pixels
        pixels = np.asarray(load_image(records[key].image))
        assert pixels.shape == (24, 32, 3)
        assert (pixels == COLOURS[key]).all()
    jpeg = np.asarray(load_image(str(records["000000006"].image)), np.int16)
    assert np.abs(jpeg - COLOURS["000000006"]).max() < 12
    with pytest.raises(BadImage) as e:
        load_image(records["000000005"].image)
    assert e.value.reason == "corrupt image"


def test_bad_references_are_bad_images_with_reasons(shards, tmp_path):
    member = webdataset.parse_reference(by_id(read_corpus(shards[0]))["000000004"].image)
    assert member is not None
    cases = {
        "missing file": member._replace(tar=tmp_path / "gone.tar"),
        "corrupt image": member._replace(offset=10**9),  # past the end of the tar
        "empty file": member._replace(size=0),
        "not an image": member._replace(offset=member.offset - 512),  # the tar header
    }
    for reason, ref in cases.items():
        with pytest.raises(BadImage) as e:
            load_image(str(ref))
        assert e.value.reason == reason, ref
    with pytest.raises(BadImage, match="missing file"):  # not a reference: a missing path
        load_image(f"{member.tar}#x@twelve:3")
    assert webdataset.member_bytes(member.tar) is None


def test_brace_patterns_expand_like_webdataset():
    assert webdataset.expand_braces("s/{00000..00002}.tar") == [
        "s/00000.tar",
        "s/00001.tar",
        "s/00002.tar",
    ]
    assert webdataset.expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert webdataset.expand_braces("{2..0}") == ["2", "1", "0"]
    assert webdataset.expand_braces("plain.tar") == ["plain.tar"]
    assert webdataset.expand_braces("x{abc}.tar") == ["x{abc}.tar"]


def test_a_brace_pattern_reads_its_shards_and_reports_missing_ones(shards):
    folder = shards[0]
    pattern = f"{folder}/{{00000..00002}}.tar"
    assert detect_format(Path(pattern)) == "webdataset"
    assert [r.id for r in read_corpus(pattern)] == IDS
    assert [r.id for r in read_corpus(f"{folder}/{{00001,00002}}.tar")] == IDS[3:]
    records = list(read_corpus(f"{folder}/{{00002..00003}}.tar"))
    assert [(r.id, r.problem) for r in records] == [
        ("000000007", None),
        (f"{folder}/00003.tar", "missing shard"),
    ]


def test_unreadable_and_truncated_shards_are_reported_not_lost(shards, tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"this is not a tar archive" * 40)
    data = (shards[0] / "00001.tar").read_bytes()
    member = webdataset.parse_reference(by_id(read_corpus(shards[0]))["000000005"].image)
    assert member is not None
    (tmp_path / "00001.tar").write_bytes(data[: member.offset + 100])  # ends inside 000000005.jpg
    records = list(read_corpus(tmp_path))
    assert [(r.id, r.problem) for r in records] == [
        (str(tmp_path / "00000.tar"), "unreadable shard"),
        ("000000004", None),
        ("000000005", None),  # its reference is kept: decoding reports it
        (str(tmp_path / "00001.tar"), "unreadable shard"),
    ]
    with pytest.raises(BadImage, match="corrupt image"):
        load_image(records[2].image)


def test_build_skips_bad_samples_with_reasons_and_search_finds_items(built, shards, encoder):
    report, root = built
    assert report.items == len(GOOD)
    assert dict(report.skipped) == {"no image in sample": 1, "corrupt image": 1}
    lines = [json.loads(x) for x in (report.path / "skipped.jsonl").read_text().splitlines()]
    assert {(r["id"], r["reason"]) for r in lines} == {
        ("000000003", "no image in sample"),
        ("000000005", "corrupt image"),
    }
    blue = by_id(read_corpus(shards[0]))["000000004"].image
    with Searcher.open("wds", root, encoder=encoder) as s:
        top = s.search(Query(image=load_image(blue)), k=1, target="images")["results"][0]
        assert top["id"] == "000000004"
        assert top["path"] == str(blue)
        texts = s.search(Query(text="a red square"), k=10)["results"]
        assert sorted(r["id"] for r in texts) == GOOD


def test_references_survive_an_index_round_trip(built, encoder):
    _, root = built
    assert verify("wds", root, sample=4, encoder=encoder).ok


def test_the_server_returns_member_bytes_and_thumbnails(built, shards, encoder):
    _, root = built
    with Searcher.open("wds", root, encoder=encoder) as s, TestClient(create_app(s)) as client:
        r = client.get("/items/000000002/image")
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/png"
        assert r.content == shards[1]["000000002.png"]
        r = client.get("/items/000000007/image")
        assert r.headers["content-type"] == "image/webp"
        r = client.get("/items/000000004/image", params={"size": 16})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (16, 12)
        assert client.get("/items/nope/image").status_code == 404


def run(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_cli_builds_from_a_folder_and_adds_from_a_pattern(shards, tmp_path):
    folder = shards[0]
    quiet = ("--no-progress", "--workers", "0", "--index-dir", tmp_path)
    tiny = ("--model", "tiny-vit", "--random-init")
    out = run("build", folder, "--name", "x", *quiet, *tiny)
    assert "no image in sample: 1" in out and "corrupt image: 1" in out
    run("build", folder / "00000.tar", "--name", "y", *quiet, *tiny)
    out = run("add", "y", f"{folder}/{{00001..00002}}.tar", *quiet)
    assert "added 3" in out and "corrupt image: 1" in out
    args = ["build", f"{folder}/nothere", "--name", "z", *quiet]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code != 0 and "does not exist" in result.output
