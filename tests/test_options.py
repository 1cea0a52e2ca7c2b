"""No option silently ignored (#20 item 3): every combination in which one option is made
meaningless by the others is refused as a usage error naming both; the meaningful ones run."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from retrieval.cli import main
from retrieval.corpus import synthetic

TINY = ("--model", "tiny-vit", "--random-init")

# (arguments after `search x`, the options the refusal names)
REFUSED = [
    (("--text", "a red square", "--image-weight", "0.3"), ("--image-weight", "--text", "--image")),
    (("--image", "IMG", "--image-weight", "0.3"), ("--image-weight", "--text")),
    (("--text", "a red square", "--mix", "0.5"), ("--mix", "--strategy")),
    (("--text", "red", "--strategy", "qbnorm", "--mix", "0.5"), ("--mix", "qbnorm")),
    (("--text", "a red square", "--overfetch", "3"), ("--overfetch", "cosine")),
    (("--image", "IMG", "--strategy", "cosine", "--overfetch", "3"), ("--overfetch", "cosine")),
    (
        ("--text", "red", "--strategy", "arith", "--overfetch", "3"),
        ("--overfetch", "one query term"),
    ),
]
ACCEPTED = [
    ("--text", "a red square", "--image", "IMG", "--image-weight", "0.3"),
    ("--text", "a red square", "--strategy", "hybrid", "--mix", "0.5"),
    ("--text", "a red square", "--strategy", "hybrid-rrf", "--mix", "0.5"),
    ("--text", "a red square", "--strategy", "qbnorm", "--overfetch", "3"),
    ("--text", "a red square", "--term", "text:-0.3:blue", "--overfetch", "3"),
]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    corpus = synthetic.generate(root / "c", n=12, seed=3)
    args = ["build", str(corpus), "--name", "x", *TINY, "--no-progress", "--workers", "0"]
    assert CliRunner().invoke(main, [*args, "--index-dir", str(root / "ix")]).exit_code == 0
    image = next(p for p in corpus.parent.rglob("*") if p.suffix in (".png", ".jpg"))
    return root / "ix", str(image)


def search(index, args):
    root, image = index
    args = [a.replace("IMG", image) for a in args]
    return CliRunner().invoke(main, ["search", "x", *args, "--index-dir", str(root)])


@pytest.mark.parametrize(("args", "named"), REFUSED)
def test_an_option_made_meaningless_is_refused_naming_both(index, args, named):
    result = search(index, args)
    assert result.exit_code == 2, result.output  # click's usage error
    line = result.output.strip().splitlines()[-1]
    assert all(n in line for n in named), line


@pytest.mark.parametrize("args", ACCEPTED)
def test_the_meaningful_combinations_run(index, args):
    result = search(index, args)
    assert result.exit_code == 0, result.output


def test_verify_takes_one_way_back(index):
    root, _ = index
    args = ["verify", "x", "--repair", "--rollback", "--index-dir", str(root)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--repair and --rollback" in result.output


@pytest.mark.parametrize("command", ["add", "verify", "search", "bench"])
def test_every_command_that_encodes_takes_the_model_options_and_checks_them(index, command):
    # The index was built with tiny-vit (random): small-vit is another model, named in one line.
    root, image = index
    corpus = str(Path(image).parent.parent / "corpus.jsonl")
    args = {
        "add": ["add", "x", corpus, "--no-progress", "--workers", "0"],
        "verify": ["verify", "x"],
        "search": ["search", "x", "--text", "a red square"],
        "bench": ["bench", corpus, "--index", "x", "-k", "1"],
    }[command]
    other = ["--model", "small-vit", "--random-init", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, *other, "--index-dir", str(root)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1
    assert "built with model tiny-vit" in line and "not small-vit" in line
    same = ["--model", "tiny-vit", "--random-init", "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, *same, "--index-dir", str(root)])
    assert result.exit_code == 0, result.output
