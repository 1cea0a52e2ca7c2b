from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch

from retrieval.errors import EncoderError
from retrieval.model.encoder import Encoder
from retrieval.model.spec import CONFIG_DIR, ModelSpec


def check_contract(x: np.ndarray, n: int, d: int) -> None:
    assert x.shape == (n, d) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)


def test_text_and_image_embeddings_follow_the_contract(encoder, synth_corpus):
    check_contract(encoder.encode_texts(["a red circle", "", "x" * 500]), 3, encoder.dim)
    paths = sorted((synth_corpus.parent / "images").glob("*.png"))[:5]
    emb, pos, failures = encoder.encode_image_files(
        [*paths, paths[0].with_name("gone.png")], batch_size=2, workers=0
    )
    check_contract(emb, 5, encoder.dim)
    assert pos.tolist() == [0, 1, 2, 3, 4] and failures == {5: "missing file"}


def test_worker_decoding_gives_the_same_vectors_as_inline(encoder, synth_corpus):
    paths = sorted((synth_corpus.parent / "images").glob("*.png"))[:7]
    a, _, _ = encoder.encode_image_files(paths, batch_size=3, workers=0)
    b, _, _ = encoder.encode_image_files(paths, batch_size=4, workers=2)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_random_init_is_the_same_in_every_load_and_leaves_rng_alone(encoder):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = Encoder.load(ModelSpec("tiny-vit", random_init=True), device="cpu")
    assert torch.rand(1) == before
    np.testing.assert_array_equal(again.encode_texts(["abc"]), encoder.encode_texts(["abc"]))


def test_config_json_path_and_local_checkpoint(tmp_path, encoder):
    cfg = json.loads((CONFIG_DIR / "tiny-vit.json").read_text())
    cfg["embed_dim"] = 48
    (tmp_path / "my-arch.json").write_text(json.dumps(cfg))
    custom = Encoder.load(ModelSpec(str(tmp_path / "my-arch.json"), random_init=True), device="cpu")
    assert custom.dim == 48
    # A checkpoint with changed weights must be what gets loaded, by path.
    with torch.no_grad():
        for p in custom.model.parameters():
            p.mul_(0.5)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": custom.model.state_dict()}, ckpt)
    spec = ModelSpec(str(tmp_path / "my-arch.json"), str(ckpt))
    loaded = Encoder.load(spec, device="cpu")
    np.testing.assert_allclose(loaded.encode_texts(["hi"]), custom.encode_texts(["hi"]), atol=1e-6)
    assert len(spec.identity().checkpoint_sha256) == 64
    # open_clip itself loads the same file.
    open_clip.create_model_and_transforms("my-arch", pretrained=str(ckpt))


def test_nan_weights_are_refused_where_embeddings_leave_the_model(tmp_path, encoder, synth_corpus):
    state = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    state["visual.proj"].fill_(float("nan"))  # the image tower only: texts still encode
    ckpt = tmp_path / "nan.pt"
    torch.save({"state_dict": state}, ckpt)
    broken = Encoder.load(ModelSpec("tiny-vit", str(ckpt)), device="cpu")
    check_contract(broken.encode_texts(["a red circle"]), 1, broken.dim)
    paths = sorted((synth_corpus.parent / "images").glob("*.png"))[:3]
    with pytest.raises(EncoderError, match=r"NaN or infinite embeddings \(3 of a batch of 3\)"):
        broken.encode_image_files(paths, workers=0)
    state["text_projection"].fill_(float("inf"))
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(EncoderError, match=r"\(1 of a batch of 1\): its weights are corrupt"):
        Encoder.load(ModelSpec("tiny-vit", str(ckpt)), device="cpu")


def test_unknown_model_and_unknown_tag_are_one_sentence_errors():
    with pytest.raises(EncoderError, match="unknown model 'nope'"):
        Encoder.load(ModelSpec("nope"))
    with pytest.raises(EncoderError, match="neither a file nor an open_clip tag.*known tags"):
        Encoder.load(ModelSpec("tiny-vit", "laion2b_s34b_b79k"))


def test_tag_that_cannot_download_names_it_and_the_local_alternative(monkeypatch):
    # Offline mode makes the hub client fail at once, as it does here without a network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EncoderError) as err:
        Encoder.load(ModelSpec("RN50", "openai"))
    msg = str(err.value)
    assert "'openai'" in msg and "--pretrained PATH" in msg and "--model effnet-minilm" in msg
    assert "--model tiny-vit --random-init" in msg and "\n" not in msg


def test_too_long_counts_tokens_against_the_context_length(encoder):
    assert encoder.too_long(["short", "word " * 40]) == [False, True]
