"""The contrastive loss against open_clip's ClipLoss and a plain reference. No models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from retrieval.train.loss import clamp_logit_scale, clip_loss, positive_mask


def features(b: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return img, txt


def test_equals_open_clip_clip_loss():
    for b, seed in [(1, 0), (7, 1), (64, 2)]:
        img, txt = features(b, 16, seed)
        scale = torch.tensor(1 / 0.07, dtype=torch.float64)
        ours = clip_loss(img.float(), txt.float(), scale.float())
        theirs = ClipLoss()(img.float(), txt.float(), scale.float())
        assert abs(ours.item() - theirs.item()) < 1e-6
        ids = torch.arange(b)  # distinct captions: the multi-positive form is the same loss
        multi = clip_loss(
            img.float(), txt.float(), scale.float(), positives=positive_mask(ids, ids)
        )
        assert abs(multi.item() - theirs.item()) < 1e-6


def test_repeated_caption_is_a_positive_not_a_negative():
    img, txt = features(4, 8, 3)
    scale = torch.tensor(10.0, dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 2])  # pairs 0 and 2 carry the same caption text
    pos = positive_mask(ids, ids)
    got = clip_loss(img, txt, scale, positives=pos)
    # Plain reference: row i's target spreads evenly over its positives.
    total = 0.0
    for logits in (scale * img @ txt.T, scale * txt @ img.T):
        for i in range(4):
            logp = torch.log_softmax(logits[i], dim=0)
            js = [j for j in range(4) if ids[j] == ids[i]]
            total += -sum(logp[j] for j in js) / len(js)
    assert torch.allclose(got, total / 8, atol=1e-12)


def test_local_losses_of_shards_average_to_the_global_loss():
    img, txt = features(12, 8, 4)
    scale = torch.tensor(20.0, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 0, 4, 5, 6, 7, 1, 9, 10, 11])
    whole = clip_loss(img, txt, scale, positives=positive_mask(ids, ids))
    parts = [
        clip_loss(img[s], txt[s], scale, img, txt, positive_mask(ids[s], ids))
        for s in (slice(0, 4), slice(4, 8), slice(8, 12))
    ]
    assert torch.allclose(sum(parts) / 3, whole, atol=1e-12)


def test_logit_scale_clamp():
    p = torch.nn.Parameter(torch.tensor(math.log(500.0)))
    clamp_logit_scale(p)
    assert math.isclose(p.exp().item(), 100.0, rel_tol=1e-5)
    p = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    clamp_logit_scale(p)
    assert math.isclose(p.exp().item(), 1 / 0.07, rel_tol=1e-6)
