"""End to end through the command line: every corpus format, bad input, search, info."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_image, write_jsonl
from PIL import Image

from retrieval.cli import main
from retrieval.index import layout
from retrieval.model.spec import SHIPPED_MODEL

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"
TINY = ("--model", "tiny-vit", "--random-init")  # tests name their model: the default downloads


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result


def make_corpora(root: Path) -> dict[str, Path]:
    """The same three images as a folder, CSV, TSV, JSONL, JSON list and COCO file."""
    colours = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    for name, rgb in colours.items():
        write_image(root / "imgs" / f"{name}.jpg", colour=rgb)
        (root / "imgs" / f"{name}.txt").write_text(f"a {name} picture\nall {name}\n")
    rows = [(f"imgs/{n}.jpg", f"a {n} picture") for n in colours]
    (root / "c.csv").write_text("filepath,title\n" + "".join(f"{p},{c}\n" for p, c in rows))
    (root / "c.tsv").write_text("filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c in rows))
    write_jsonl(root / "c.jsonl", [{"image": p, "caption": c} for p, c in rows])
    (root / "list.json").write_text(json.dumps([{"image": p, "captions": [c]} for p, c in rows]))
    coco = {
        "images": [{"id": i, "file_name": p} for i, (p, _) in enumerate(rows)],
        "annotations": [
            {"id": 10 + i, "image_id": i, "caption": c} for i, (_, c) in enumerate(rows)
        ],
    }
    (root / "coco.json").write_text(json.dumps(coco))
    return {
        "folder": root / "imgs",
        "csv": root / "c.csv",
        "tsv": root / "c.tsv",
        "jsonl": root / "c.jsonl",
        "json-list": root / "list.json",
        "coco": root / "coco.json",
    }


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    return make_corpora(tmp_path_factory.mktemp("corpora"))


@pytest.mark.parametrize("fmt", ["folder", "csv", "tsv", "jsonl", "json-list", "coco"])
def test_build_and_search_every_format(corpora, tmp_path, fmt):
    out = run(
        "build",
        corpora[fmt],
        "--name",
        fmt,
        "--index-dir",
        tmp_path,
        "--no-progress",
        "--workers",
        "0",
        *TINY,
    ).output
    assert "3 images and" in out and "skipped 0" in out
    res = json.loads(
        run(
            "search", fmt, "--text", "a red picture", "-k", "2", "--json", "--index-dir", tmp_path
        ).output
    )
    assert res["query"] == {"text": "a red picture"} and len(res["results"]) == 2
    assert set(res["results"][0]) >= {"rank", "id", "score", "path", "captions"}
    image = corpora["folder"] / "green.jpg"
    res = json.loads(run("search", fmt, "--image", image, "--json", "--index-dir", tmp_path).output)
    assert res["target"] == "captions" and len(res["results"]) == 3
    sheet = tmp_path / "sheet.png"
    table = run(
        "search",
        fmt,
        "--image",
        image,
        "--target",
        "images",
        "--index-dir",
        tmp_path,
        "--grid",
        sheet,
    ).output
    assert table.splitlines()[0].split()[:3] == ["rank", "score", "id"]
    assert "1.0000" in table.splitlines()[1]  # the image itself comes first
    assert f"contact sheet: {sheet}" in table and Image.open(sheet).format == "PNG"


def test_info_and_errors_are_one_line(corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_INDEX_DIR", str(tmp_path))
    run("build", corpora["jsonl"], "--name", "j", "--no-progress", "--workers", "0", *TINY)
    info = run("info", "j").output
    assert "tiny-vit" in info and "items     3" in info
    assert json.loads(run("info", "j", "--json").output)["counts"]["captions"] == 3
    for args, message in [
        (("search", "nope", "--text", "x"), "no index named 'nope'"),
        (("search", "j", "--text", "x", "--model", "small-vit"), "built with model tiny-vit"),
        (("search", "j"), "give --text, --image or both"),
        (("search", "j", "--text", "x", "--term", "bad"), "use text:WEIGHT:words"),
        (("search", "j", "--text", "x", "--where", "year>=x"), "needs a number"),
        (
            (
                "search",
                "j",
                "--text",
                "x",
                "--image",
                corpora["folder"] / "red.jpg",
                "--image-weight",
                "1.5",
            ),
            "between 0 and 1, not 1.5",
        ),
        (
            ("search", "j", "--text", "x", "--strategy", "hybrid", "--mix", "2"),
            "mix must be between 0 and 1",
        ),
        (
            ("search", "j", "--text", "x", "--strategy", "qbnorm", "--overfetch", "0"),
            "overfetch must be between 1",
        ),
        (("bench", corpora["jsonl"], "-k", "0,5", *TINY), "every k must be at least 1: 0, 5"),
        (("build", corpora["jsonl"], "--name", "bad/name"), "bad index name"),
        (("build", corpora["jsonl"], "--name", "y", "--index", "Nope", *TINY), "bad FAISS factory"),
        (("build", corpora["jsonl"], "--name", "y", "--model", "nope"), "unknown model 'nope'"),
    ]:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code != 0
        assert message in result.output, result.output
        assert "Traceback" not in result.output


def test_verbose_or_debug_env_shows_the_traceback_behind_the_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_INDEX_DIR", str(tmp_path))
    monkeypatch.delenv("RETRIEVAL_DEBUG", raising=False)
    args = ["search", "nope", "--text", "x"]
    quiet = CliRunner().invoke(main, args)
    assert quiet.exit_code == 1 and "Traceback" not in quiet.output
    for argv, env in (
        (["-v", *args], {}),
        (args, {"RETRIEVAL_DEBUG": "1"}),
    ):
        shown = CliRunner().invoke(main, argv, env=env)
        assert shown.exit_code == 1
        assert "Traceback (most recent call last)" in shown.output
        assert "layout.py" in shown.output and "in resolve" in shown.output  # where it arose
        assert shown.output.rstrip().endswith("(indexes there: none)")  # the line comes last
    off = CliRunner().invoke(main, args, env={"RETRIEVAL_DEBUG": "0"})
    assert "Traceback" not in off.output


def test_the_default_model_offline_is_one_line_naming_the_ways_out(corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as without a network, and never a download here
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = ["build", corpora["jsonl"], "--name", "x", "--index-dir", tmp_path, "--workers", "0"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    line = result.output.strip()
    assert "\n" not in line and "'laion2b_s34b_b79k' for ViT-B-32" in line
    for way in ("--model effnet-minilm", "--pretrained PATH", "--model tiny-vit --random-init"):
        assert way in line, line
    # A model without default weights is never silently random.
    result = CliRunner().invoke(main, [str(a) for a in [*args, "--model", "tiny-vit"]])
    assert result.exit_code == 1 and "\n" not in result.output.strip()
    assert "model tiny-vit needs weights" in result.output and "--random-init" in result.output
    both = CliRunner().invoke(main, [str(a) for a in [*args, *TINY, "--pretrained", "openai"]])
    assert "give --pretrained or --random-init, not both" in both.output


def test_the_random_weights_warning_is_printed_once(corpora, tmp_path):
    exe = shutil.which("retrieval", path=str(Path(sys.executable).parent))
    args = [exe, "build", str(corpora["csv"]), "--name", "r", "--index-dir", str(tmp_path)]
    done = subprocess.run(
        [*args, "--no-progress", *TINY], capture_output=True, text=True, check=True
    )
    warned = [ln for ln in done.stderr.splitlines() if "random" in ln.lower()]
    assert warned == [
        "WARNING retrieval.model.encoder: model tiny-vit has random weights (--random-init): "
        "its rankings mean nothing"
    ], done.stderr


def test_pretrained_alone_is_used_and_finds_a_moved_checkpoint(corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_INDEX_DIR", str(tmp_path / "ix"))
    shipped = SHIPPED_MODEL
    first = tmp_path / "a.pt"
    shutil.copy(shipped, first)
    out = run("bench", corpora["jsonl"], "--model", "tiny-vit", "--pretrained", first).output
    assert f"model tiny-vit ({first})" in out  # not "random init"
    build = ("build", corpora["jsonl"], "--name", "m", "--model", "tiny-vit", "--workers", "0")
    run(*build, "--pretrained", first)
    moved = first.rename(tmp_path / "b.pt")
    result = CliRunner().invoke(main, ["search", "m", "--text", "a red picture"])
    assert result.exit_code != 0 and "its new path with --pretrained" in result.output
    out = run("search", "m", "--text", "a red picture", "--pretrained", moved, "--json").output
    assert len(json.loads(out)["results"]) == 3
    other = torch.load(moved, weights_only=True)
    other["state_dict"]["logit_scale"] += 1.0
    torch.save(other, tmp_path / "c.pt")
    result = CliRunner().invoke(
        main, ["search", "m", "--text", "x", "--pretrained", tmp_path / "c.pt"]
    )
    assert result.exit_code != 0 and "was built with model tiny-vit" in result.output


def test_wrong_checkpoint_files_are_one_line_errors(corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_INDEX_DIR", str(tmp_path / "ix"))
    shipped = SHIPPED_MODEL
    state_file = tmp_path / "epoch_1.state.pt"  # what sits beside epoch_1.pt: no weights
    torch.save({"optimizer": {"state": {}}, "epoch": 1, "history": [{"epoch": 1}]}, state_file)
    photo = corpora["folder"] / "red.jpg"
    build = ("build", corpora["jsonl"], "--name", "w", "--workers", "0", "--model", "tiny-vit")
    build = (*build, "--pretrained")
    for args, message in [
        (("export", state_file, tmp_path / "o.pt"), "holds no model weights"),
        (("export", photo, tmp_path / "o.pt"), "is not a model checkpoint"),
        ((*build, photo), "is not a model checkpoint"),
        ((*build, state_file), "holds no model weights"),
        ((*build, shipped, "--model", "small-vit"), "is --model the architecture"),
    ]:
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code != 0 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_damaged_index_is_a_one_line_error(corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_INDEX_DIR", str(tmp_path))
    run("build", corpora["jsonl"], "--name", "d", "--no-progress", "--workers", "0", *TINY)
    (tmp_path / "d" / "caption.faiss").resolve().unlink()
    result = CliRunner().invoke(main, ["search", "d", "--text", "x"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "index 'd' is damaged: caption.faiss is missing" in result.output
    assert "retrieval verify d --repair" in result.output


def test_add_remove_compact_verify(corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_INDEX_DIR", str(tmp_path))
    quiet = ("--no-progress", "--workers", "0")
    run("build", corpora["jsonl"], "--name", "j", "--index", "HNSW8", *quiet, *TINY)
    more = write_jsonl(
        tmp_path / "more.jsonl",
        [{"id": "extra", "image": str(corpora["folder"] / "red.jpg"), "caption": "more red"}],
    )
    out = run("add", "j", more, *quiet).output
    assert "added 1, replaced 0" in out
    assert "skipped 1 (id already in the index" in run("add", "j", more, *quiet).output
    assert "added 0, replaced 1" in run("add", "j", more, "--upsert", *quiet).output
    (tmp_path / "ids.txt").write_text("extra\n\nnot-there\n")
    out = run("remove", "j", "--ids-file", tmp_path / "ids.txt").output
    assert (
        "removed 1; not in the index: 1 (not-there)" in out and "2 tombstones" in out
    )  # the upserted row, too
    info = run("info", "j").output
    assert "items     3" in info and "2 items still in the HNSW8 index as tombstones" in info
    assert "remove    " in info
    assert "verified: all checks passed" in run("verify", "j", "--sample", "3").output
    assert "0 tombstones" in run("compact", "j").output
    result = run("remove", "j", ok=False)
    assert "give the items to remove" in result.output
    folder = tmp_path / "j"
    (folder / "image.faiss").write_bytes((folder / "image.faiss").read_bytes()[:-8])
    out = run("verify", "j", "--sample", "0", ok=False).output
    assert "FAIL checksums: image.faiss changed" in out and "check(s) FAILED" in out


def test_synth_and_demo(tmp_path):
    out = run("demo", "--workdir", tmp_path / "d", "-n", "24", "--index-dir", tmp_path).output
    assert "trained weights" in out and "tiny-vit-shapes.pt" in out
    assert "24 images and 72 captions" in out and out.count("query {") == 5
    assert "(re-ranked: --rerank 20)" in out  # the shipped model carries its re-ranker
    untrained = run("demo", "--workdir", tmp_path / "d", *TINY, "--index-dir", tmp_path).output
    assert "random weights (--random-init)" in untrained
    assert "wrote" in run("synth", tmp_path / "s", "-n", "3").output
    bad = run("synth", tmp_path / "b", "--relations", "beside", ok=False).output
    assert "unknown relations beside" in bad and "Traceback" not in bad
    assert not (tmp_path / "b").exists()


def test_shipped_demo_model_finds_the_scene(tmp_path):
    from retrieval.corpus import synthetic
    from retrieval.corpus.readers import read_corpus
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import SHIPPED_MODEL, ModelSpec
    from retrieval.scoring.metrics import grouped_text_to_image_ranks, recall_at_k

    records = list(read_corpus(synthetic.generate(tmp_path, n=60, seed=4242)))
    enc = Encoder.load(ModelSpec("tiny-vit", str(SHIPPED_MODEL)), device="cpu")
    images, _, _ = enc.encode_image_files([r.image for r in records], workers=0)
    texts = [c for r in records for c in r.captions]
    owner = np.array([i for i, r in enumerate(records) for _ in r.captions])
    scenes = np.array([r.extra["scene"] for r in records])
    ranks = grouped_text_to_image_ranks(images, enc.encode_texts(texts), scenes, scenes[owner])
    recall = recall_at_k(ranks, (1, 5))
    # An untrained model scores about 0.02 and 0.1 here; a bag-of-words model ~0.6 and 1.0.
    assert recall[1] >= 0.8 and recall[5] >= 0.95, recall


def test_shipped_demo_model_reads_word_order():
    """A caption prefers its own scene over the mirrored one ("A left of B" vs "B left of A"),
    which a bag-of-words model cannot do better than chance."""
    from retrieval.corpus import synthetic
    from retrieval.model.encoder import Encoder
    from retrieval.model.spec import SHIPPED_MODEL, ModelSpec

    enc = Encoder.load(ModelSpec("tiny-vit", str(SHIPPED_MODEL)), device="cpu")
    captions, images, flipped = synthetic.mirror_pairs(40, seed=77)
    texts = enc.encode_texts(captions)
    images, flipped = enc.encode_pil(images), enc.encode_pil(flipped)
    own, other = (texts * images).sum(1), (texts * flipped).sum(1)
    assert (own > other).mean() >= 0.85, (own > other).mean()


def test_a_writer_stopped_by_sigterm_says_so_in_one_line(corpora, tmp_path):
    exe = shutil.which("retrieval", path=str(Path(sys.executable).parent))
    args = [exe, "build", str(corpora["csv"]), "--name", "t", "--index-dir", str(tmp_path), *TINY]
    with layout.writer_lock(tmp_path, "t"):  # the build waits for it: a moment to stop it in
        proc = subprocess.Popen(
            [*args, "--wait", "60"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        told = proc.stderr.readline()
        assert "waiting up to 60s: pid" in told and "is changing 't'" in told
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(30) == 1
    assert rest.strip().splitlines() == [
        "Error: interrupted: nothing half-written was published (build, add and train continue "
        "with --resume)"
    ]
    assert layout.list_indexes(tmp_path) == []


def test_commands_run_off_the_main_thread_and_leave_the_sigterm_handler_alone():
    before = signal.getsignal(signal.SIGTERM)
    out = []
    worker = threading.Thread(target=lambda: out.append(CliRunner().invoke(main, ["info", "x"])))
    worker.start()
    worker.join()
    assert "no index named 'x'" in out[0].output
    CliRunner().invoke(main, ["info", "x"])
    assert signal.getsignal(signal.SIGTERM) is before


def test_console_script_builds_and_searches_in_fresh_processes(corpora, tmp_path):
    exe = shutil.which("retrieval", path=str(Path(sys.executable).parent))
    assert exe, "the console script is installed with the package"
    env_dir = ["--index-dir", str(tmp_path)]
    subprocess.run(
        [exe, "build", str(corpora["csv"]), "--name", "p", "--no-progress", *env_dir, *TINY],
        check=True,
        capture_output=True,
    )
    # Another process loads the same (seeded) random model, so the image finds itself.
    res = subprocess.run(
        [
            exe,
            "search",
            "p",
            "--image",
            str(corpora["folder"] / "blue.jpg"),
            "--target",
            "images",
            "--json",
            *env_dir,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    top = json.loads(res.stdout)["results"][0]
    assert top["id"] == "imgs/blue" and top["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="../shared/data/coco-mini is not present")
def test_coco_mini_real_photos(tmp_path):
    out = run(
        "build",
        COCO_MINI / "captions.json",
        "--name",
        "coco",
        "--index-dir",
        tmp_path,
        "--no-progress",
        *TINY,
    ).output
    assert "239 images and 1195 captions" in out and "skipped 0" in out
    res = json.loads(
        run(
            "search",
            "coco",
            "--text",
            "a cat on a bed",
            "-k",
            "3",
            "--json",
            "--index-dir",
            tmp_path,
        ).output
    )
    assert len(res["results"]) == 3 and res["results"][0]["extra"]["split"]
