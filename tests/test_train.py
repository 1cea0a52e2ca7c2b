"""Training: gradient caching, DDP, schedules, multi-positive batches, checkpoints, resume."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from ddp_worker import global_batch

from retrieval.cli import main
from retrieval.corpus import synthetic
from retrieval.errors import CorpusError, TrainError
from retrieval.index.build import build
from retrieval.index.config import BuildConfig
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec, RerankerConfig
from retrieval.train.config import TrainConfig
from retrieval.train.gradcache import contrastive_step
from retrieval.train.loop import epoch_batches, lr_lambda, param_groups, train
from retrieval.train.run import RunState, score

HERE = Path(__file__).parent


def grads_after_step(config: Path, chunk: int | None):
    model = Encoder.load(ModelSpec(str(config), random_init=True), device="cpu").model.train()
    images, tokens, ids = global_batch(
        Encoder.load(ModelSpec(str(config), random_init=True), device="cpu"), 12
    )
    loss = contrastive_step(model, images, tokens, ids, chunk)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def test_gradient_caching_gives_the_big_batch_gradient(micro_config):
    loss, full = grads_after_step(micro_config, None)
    for chunk in (5, 1):
        loss_c, cached = grads_after_step(micro_config, chunk)
        assert loss_c == pytest.approx(loss, abs=1e-6)
        assert_same_grads(full, cached)


@pytest.mark.parametrize("chunk", [0, 4])
def test_two_processes_match_one_process(micro_config, tmp_path, chunk):
    out = tmp_path / "ddp.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + chunk + os.getpid() % 400),
        str(HERE / "ddp_worker.py"),
        str(micro_config),
        str(out),
        str(chunk),
    ]
    # The tree under test first: not whatever copy of `retrieval` is installed.
    paths = os.pathsep.join([str(HERE), str(HERE.parent)])
    env = {**os.environ, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    got = torch.load(out, weights_only=True)
    loss, grads = grads_after_step(micro_config, None)
    assert got["loss"] == pytest.approx(loss, abs=1e-6)
    assert_same_grads(got["grads"], grads)


def test_batches_never_repeat_an_image_and_differ_per_epoch():
    a, draws = epoch_batches(103, epoch=1, seed=0, size=16)
    assert a.shape == (6, 16) and len(np.unique(a)) == a.size
    assert draws.shape == (103,)
    b, _ = epoch_batches(103, epoch=2, seed=0, size=16)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, epoch_batches(103, epoch=1, seed=0, size=16)[0])


def test_batch_groups_share_a_batch():
    # Groups of sizes 1..4 over 101 items; batches of 12 split a group only at a boundary.
    groups = np.repeat(np.arange(44), np.tile([1, 2, 3, 4], 11))[:101]
    a, _ = epoch_batches(101, epoch=3, seed=0, size=12, groups=groups)
    assert a.shape == (8, 12) and len(np.unique(a)) == a.size
    flat = groups[a.ravel()]
    runs = [g for i, g in enumerate(flat) if i == 0 or flat[i - 1] != g]
    assert len(runs) == len(set(runs))  # each group's items sit together
    split = sum(len(set(groups[b]) & set(groups[c])) for b, c in itertools.pairwise(a))
    assert split <= len(a) - 1
    b, _ = epoch_batches(101, epoch=4, seed=0, size=12, groups=groups)
    assert not np.array_equal(a, b)


def test_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(total=110, warmup=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0, abs=1e-12)


def test_no_weight_decay_on_gains_biases_and_logit_scale(micro_config):
    model = Encoder.load(ModelSpec(str(micro_config), random_init=True), device="cpu").model
    no_decay, decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "logit_scale" in {names[id(p)] for p in no_decay["params"]}
    assert all(p.ndim < 2 for p in no_decay["params"])  # biases, norm gains, scales
    assert all(p.ndim >= 2 and "bias" not in names[id(p)] for p in decay["params"])


def test_equal_caption_texts_share_an_id(tmp_path, micro_config):
    from retrieval.corpus.records import Record
    from retrieval.train.trainset import load_trainset

    for i in range(3):
        synthetic.render(
            synthetic.Scene("red", "circle", "above", "blue", "square"),
            32,
            np.random.default_rng(i),
        ).save(tmp_path / f"{i}.png")
    records = [
        Record("a", tmp_path / "0.png", ("same", "other")),
        Record("b", tmp_path / "1.png", ("same",)),
        Record("c", tmp_path / "2.png", ("",)),
    ]
    enc = Encoder.load(ModelSpec(str(micro_config), random_init=True), device="cpu")
    ts = load_trainset(records, enc, tmp_path / "cache", workers=0, progress=False)
    assert len(ts) == 2 and ts.skipped == [("c", "no caption")]
    assert ts.caption_ids.tolist() == [0, 1, 0]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("train"), n=56, seed=5, size=32)


def run_train(corpus, out, cfg, **kw):
    base = dict(
        model=ModelSpec(str(cfg), random_init=True),
        batch_size=16,
        workers=0,
        progress=False,
        warmup=2,
        lr=1e-3,
        seed=1,
    )
    return train(corpus, out, TrainConfig(**(base | kw)))


def test_resume_continues_exactly(small_corpus, micro_config, tmp_path):
    straight = run_train(small_corpus, tmp_path / "a", micro_config, epochs=2, val_fraction=0.2)
    run_train(small_corpus, tmp_path / "b", micro_config, epochs=2, steps=2, val_fraction=0.2)
    resumed = run_train(
        small_corpus, tmp_path / "b", micro_config, epochs=2, val_fraction=0.2, resume=True
    )
    assert straight.steps == resumed.steps == 4
    a = torch.load(straight.latest, weights_only=True)["state_dict"]
    b = torch.load(resumed.latest, weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert "val_image_retrieval_recall@5" in resumed.history[-1]
    # The saved best includes the epoch it was saved with, so a resume keeps the same best.pt.
    states = [saved_state(run.latest) for run in (straight, resumed)]
    assert states[0].best == states[1].best == max(score(r) for r in straight.history)
    best_epochs = [torch.load(run.best, weights_only=True)["epoch"] for run in (straight, resumed)]
    assert best_epochs[0] == best_epochs[1]


def saved_state(latest: Path) -> RunState:
    return RunState.from_dict(torch.load(latest.with_suffix(".state.pt"), weights_only=False))


def test_run_state_reads_the_state_files_of_earlier_versions():
    old = {  # epoch_N.state.pt as every version so far wrote it
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"last_epoch": 7},
        "epoch": 2,
        "step": 7,
        "best": 0.25,
        "history": [
            {"epoch": 1, "step": 4, "val_image_retrieval_recall@1": 0.25},
            {"epoch": 2, "step": 7, "val_image_retrieval_recall@1": 0.2},
        ],
    }
    state = RunState.from_dict(old)
    assert state == RunState(2, 7, 0.25, tuple(old["history"]))
    assert state.to_dict() == {k: old[k] for k in ("epoch", "step", "best", "history")}
    assert RunState.from_dict(state.to_dict()) == state
    with pytest.raises(FrozenInstanceError):
        state.step = 8
    after = state.after({"epoch": 3, "step": 9, "samples_per_s": 1.0})
    assert (after.epoch, after.step, after.best, len(after.history)) == (3, 9, 0.25, 3)
    assert len(state.history) == 2


def test_resume_needs_only_the_run_not_the_checkpoint_it_started_from(
    small_corpus, micro_config, tmp_path
):
    base = tmp_path / "base.pt"
    model = Encoder.load(ModelSpec(str(micro_config), random_init=True), device="cpu").model
    torch.save({"state_dict": model.state_dict()}, base)
    spec = ModelSpec(str(micro_config), str(base))
    out = tmp_path / "run"
    run_train(small_corpus, out, micro_config, model=spec, epochs=2, steps=2)
    base.unlink()  # moved away after the first run started
    done = run_train(small_corpus, out, micro_config, model=spec, epochs=2, resume=True)
    assert done.steps > 2 and [r["epoch"] for r in done.history] == [1, 2]


def test_resume_refuses_other_settings_and_a_finished_run(small_corpus, micro_config, tmp_path):
    run_train(small_corpus, tmp_path, micro_config, epochs=1, batch_size=8)
    with pytest.raises(TrainError, match=r"as it was started: pass --batch-size 8 \(its config"):
        run_train(small_corpus, tmp_path, micro_config, epochs=2, resume=True)  # batch 16
    with pytest.raises(TrainError, match="has made all its 7 steps; give more --epochs"):
        run_train(small_corpus, tmp_path, micro_config, epochs=1, batch_size=8, resume=True)
    more = run_train(small_corpus, tmp_path, micro_config, epochs=2, batch_size=8, resume=True)
    assert more.steps == 14


def test_save_every_skips_checkpoints_but_logs_every_epoch(small_corpus, micro_config, tmp_path):
    run = run_train(small_corpus, tmp_path, micro_config, epochs=5, save_every=2)
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("epoch_*.pt")) == [
        f"epoch_{e}{s}.pt" for e in (2, 4, 5) for s in ("", ".state")
    ]
    assert torch.load(run.latest, weights_only=True)["epoch"] == 5
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5]


def test_checkpoint_is_open_clip_compatible_and_builds_an_index(
    small_corpus, micro_config, tmp_path
):
    result = run_train(small_corpus, tmp_path / "run", micro_config, epochs=1, val_fraction=0.2)
    assert result.best and result.best.is_file()
    model, _, _ = open_clip.create_model_and_transforms("micro-vit", pretrained=str(result.best))
    saved = torch.load(result.best, weights_only=True)["state_dict"]
    torch.testing.assert_close(model.state_dict()["logit_scale"], saved["logit_scale"])
    report = build(
        small_corpus,
        "trained",
        BuildConfig(
            model=ModelSpec(str(micro_config), str(result.best)), progress=False, workers=0
        ),
        index_dir=tmp_path / "ix",
    )
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] and report.items == 56


def test_divergence_stops_before_the_weights_and_keeps_saved_checkpoints(
    small_corpus, micro_config, tmp_path, caplog
):
    # lr 100 here: the loss turns NaN at step 9 of 18 (3 a epoch) for seeds 0-3.
    with pytest.raises(TrainError, match="diverged: the loss became nan") as err:
        run_train(small_corpus, tmp_path, micro_config, epochs=6, lr=100.0, warmup=0)
    failed = int(re.search(r"\(epoch (\d+)\)", str(err.value)).group(1))
    assert failed >= 2, "diverged in epoch 1: nothing saved to check"
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("epoch_*[0-9].pt")) == [
        f"epoch_{e}.pt" for e in range(1, failed)
    ]
    latest = torch.load(ckpt / "latest.pt", weights_only=True)
    assert latest["epoch"] == failed - 1
    assert all(torch.isfinite(v).all() for v in latest["state_dict"].values())
    spec = ModelSpec(str(micro_config), str(ckpt / "latest.pt"))
    assert np.isfinite(Encoder.load(spec, device="cpu").encode_texts(["a red circle"])).all()
    # A new run may not overwrite them; --resume keeps the run's schedule (so diverges again
    # here), and refuses a different --lr, which it could not apply.
    with pytest.raises(TrainError, match="already holds a training run.*another --out"):
        run_train(small_corpus, tmp_path, micro_config, epochs=6, lr=1e-4)
    with pytest.raises(TrainError, match="diverged"):
        run_train(small_corpus, tmp_path, micro_config, epochs=6, lr=None, warmup=0, resume=True)
    with pytest.raises(TrainError, match=r"as it was started: pass --lr 100\.0 \(its config"):
        run_train(small_corpus, tmp_path, micro_config, epochs=6, lr=1e-4, warmup=0, resume=True)
    # The command line says it in one line.
    args = ["train", str(small_corpus), "--out", str(tmp_path / "cli"), "--model"]
    args += [
        str(micro_config),
        "--lr",
        "1e6",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--no-progress",
        "--random-init",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "diverged: the loss became nan at step" in result.output


def test_items_left_out_of_training_are_listed_with_their_reasons(
    small_corpus, micro_config, tmp_path
):
    lines = small_corpus.read_text().splitlines()
    first = json.loads(lines[0])
    extra = [
        first,  # the same id again
        {**first, "id": "gone", "image": "images/gone.png"},
        {**first, "id": "mute", "caption": "", "captions": [""]},
    ]
    corpus = small_corpus.with_name("with_bad.jsonl")
    corpus.write_text("\n".join([*lines, *map(json.dumps, extra)]) + "\n")
    run_train(corpus, tmp_path, micro_config, steps=1)
    rows = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert {(r["id"], r["reason"]) for r in rows} == {
        (str(first["id"]), "duplicate id"),
        ("gone", "missing file"),
        ("mute", "no caption"),
    }


def test_an_unknown_batch_group_field_is_an_error_before_any_decoding(
    small_corpus, micro_config, tmp_path
):
    with pytest.raises(CorpusError, match="no item has the field 'nosuch' \\(fields: .*scene"):
        run_train(small_corpus, tmp_path, micro_config, batch_group="nosuch")
    assert not (tmp_path / "cache").exists()


def test_locked_towers_do_not_move(small_corpus, micro_config, tmp_path):
    before = Encoder.load(
        ModelSpec(str(micro_config), random_init=True), device="cpu"
    ).model.state_dict()
    result = run_train(
        small_corpus, tmp_path / "lock", micro_config, epochs=1, lock_image=0, lock_text=0
    )
    after = torch.load(result.latest, weights_only=True)["state_dict"]
    frozen = [k for k in after if k.startswith(("visual.", "transformer.", "token_embedding"))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["logit_scale"], after["logit_scale"])


def test_cli_train_with_chunks_and_accumulation(small_corpus, micro_config, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "train",
            str(small_corpus),
            "--out",
            str(tmp_path / "cli"),
            "--model",
            str(micro_config),
            "--batch-size",
            "8",
            "--accum-steps",
            "3",
            "--chunk-size",
            "4",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--no-progress",
            "--random-init",
            "--grad-clip",
            "1.0",
            "--val-fraction",
            "0.25",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in result.output.splitlines() if x.startswith("{")]
    assert rows[0]["step"] == 1  # 42 training pairs -> one step of 8 x 3
    assert (tmp_path / "cli" / "checkpoints" / "epoch_1.state.pt").is_file()


def test_a_state_file_from_before_runstate_resumes_with_its_own_epoch_as_best():
    from retrieval.train.run import RunState

    rows = [
        {"epoch": 1, "step": 2, "val_image_retrieval_recall@1": 0.2},
        {"epoch": 2, "step": 4, "val_image_retrieval_recall@1": 0.6},
    ]
    # Older files stored the best from before the saved epoch (0.2 here).
    old = {"epoch": 2, "step": 4, "best": 0.2, "history": rows, "optimizer": {}}
    assert RunState.from_dict(old).best == pytest.approx(0.6)
    new = RunState(2, 4, 0.6, tuple(rows))
    assert RunState.from_dict(new.to_dict()) == new


def test_neighbourhoods_take_the_nearest_unplaced_by_hand():
    from retrieval.train.hard_negatives import neighbourhoods, refresh_epoch

    near = np.array([[1, 2, 3], [0, 2, 3], [1, 0, 4], [4, 0, 1], [3, 2, 0], [4, 3, 2]])
    groups = neighbourhoods(near, 3, seed=0)
    order = np.random.default_rng(0).permutation(6)
    # By hand: walk `order`; each unplaced item starts a group with its nearest unplaced ones.
    want, code = np.full(6, -1), 0
    for i in order:
        if want[i] >= 0:
            continue
        members = [i, *[j for j in near[i] if want[j] < 0][:2]]
        want[members] = code
        code += 1
    np.testing.assert_array_equal(groups, want)
    assert np.bincount(groups).max() <= 3
    assert [refresh_epoch(e, 3) for e in range(1, 8)] == [1, 1, 1, 4, 4, 4, 7]


def test_hard_negative_batches_resume_exactly(small_corpus, micro_config, tmp_path):
    # 3 steps an epoch; the warm-up outlasts the run, so a shorter first leg has the same rates.
    kw = dict(epochs=4, hard_negatives=2, warmup=100)
    straight = run_train(small_corpus, tmp_path / "a", micro_config, **kw)
    run_train(small_corpus, tmp_path / "b", micro_config, **kw, steps=3)  # epoch 1 only
    resumed = run_train(small_corpus, tmp_path / "b", micro_config, **kw, resume=True)
    assert straight.steps == resumed.steps == 12
    a = torch.load(straight.latest, weights_only=True)["state_dict"]
    b = torch.load(resumed.latest, weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
    for run in "ab":
        mined = sorted(p.name for p in (tmp_path / run / "hard_negatives").iterdir())
        assert mined == ["epoch_1.npy", "epoch_3.npy"]
    with pytest.raises(TrainError, match="not both"):
        kw = dict(hard_negatives=1, batch_group="relation")
        run_train(small_corpus, tmp_path / "c", micro_config, **kw)


def test_itm_resume_continues_exactly(small_corpus, micro_config, tmp_path):
    """An --itm run interrupted after its first epoch ends with the same dual encoder and the
    same re-ranker as one that was not (the warm-up outlasts the run: same rates)."""
    kw = dict(epochs=2, itm=True, warmup=100, reranker=RerankerConfig(32, 1, 2))
    straight = run_train(small_corpus, tmp_path / "a", micro_config, **kw)
    run_train(small_corpus, tmp_path / "b", micro_config, **kw, steps=3)
    resumed = run_train(small_corpus, tmp_path / "b", micro_config, **kw, resume=True)
    a = torch.load(straight.latest, weights_only=True)
    b = torch.load(resumed.latest, weights_only=True)
    for part in ("state_dict",):
        for name in a[part]:
            torch.testing.assert_close(a[part][name], b[part][name], atol=0, rtol=0, msg=name)
    for name, value in a["reranker"]["state_dict"].items():
        torch.testing.assert_close(value, b["reranker"]["state_dict"][name], atol=0, rtol=0)
    assert a["reranker"]["encoder_sha256"] == b["reranker"]["encoder_sha256"]
