"""The cross-attention re-ranker: a second stage that reads a caption against an image's patches.

A dual encoder scores an image and a text by one dot product of two pooled vectors, so it can
be a bag of words ("a red circle left of a blue square" and its mirror score alike). The
re-ranker is intermediate fusion as in ALBEF and BLIP's image-text matching (ITM) head: a few
layers in which the text's token states attend to each other and, by cross-attention, to the
image tower's patch tokens, then a match head giving one logit, "this text describes this
image". It reads the token outputs of the dual encoder's own towers (`retrieval.model.tokens`),
so it belongs to one dual encoder: a checkpoint holds both, and the re-ranker records a digest
of the dual encoder it was trained on; a pair that does not match is refused in one line.

In a checkpoint (``retrieval train --itm``), beside open_clip's ``state_dict``::

    "reranker": {"config": {...RerankerConfig}, "text_width", "image_width", "image_tokens",
                 "context_length", "encoder_sha256", "state_dict": {...}}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EncoderError
from .checkpoints import RERANKER as KEY
from .checkpoints import read_checkpoint, state_digest
from .spec import RerankerConfig


@dataclass(frozen=True)
class Shapes:
    """What the towers hand the re-ranker: token widths, patch count, text context length."""

    text_width: int
    image_width: int
    image_tokens: int
    context_length: int


class Reranker(nn.Module):
    """(text states (B, L, Wt), text mask (B, L), patches (B, P, Wi)) -> (B,) match logits."""

    def __init__(self, config: RerankerConfig, shapes: Shapes) -> None:
        super().__init__()
        self.config, self.shapes = config, shapes
        w = config.width
        self.text_in = nn.Linear(shapes.text_width, w)
        self.image_in = nn.Linear(shapes.image_width, w)
        # The towers' tokens carry their positions already; these learn what position means to
        # this head (a timm trunk's feature map has no position embedding at all).
        self.text_pos = nn.Parameter(torch.zeros(shapes.context_length + 1, w))
        self.image_pos = nn.Parameter(torch.zeros(shapes.image_tokens, w))
        self.cls = nn.Parameter(torch.zeros(1, 1, w))
        nn.init.normal_(self.text_pos, std=0.02)
        nn.init.normal_(self.image_pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        layer = nn.TransformerDecoderLayer(
            w, config.heads, 4 * w, dropout=0.0, batch_first=True, norm_first=True
        )
        self.fusion = nn.TransformerDecoder(layer, config.layers)
        self.norm = nn.LayerNorm(w)
        self.head = nn.Linear(w, 1)

    def forward(
        self, text: torch.Tensor, mask: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        # Padding after the longest text is masked anyway: cut, so it costs nothing.
        length = max(int(mask.sum(dim=1).max()), 1) if mask.numel() else mask.shape[1]
        text, mask = text[:, :length], mask[:, :length]
        dtype = self.text_in.weight.dtype
        t = self.text_in(text.to(dtype))
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        t = t + self.text_pos[: t.shape[1]]
        keep = torch.cat([mask.new_ones(len(mask), 1), mask], dim=1)
        p = self.image_in(patches.to(dtype)) + self.image_pos
        x = self.fusion(t, p, tgt_key_padding_mask=~keep)
        return self.head(self.norm(x[:, 0]))[:, 0]


def encoder_digest(model: nn.Module) -> str:
    """Digest of the dual encoder's weights as fp16: the same for a full checkpoint and its
    fp16 export (`retrieval export`), different once any weight changes."""
    state = {
        k: v.half() if v.is_floating_point() else v
        for k, v in model.state_dict().items()
        if not k.startswith(f"{KEY}.") and k not in ("logit_scale", "logit_bias")
    }
    return state_digest(state)


def payload(reranker: Reranker, model: nn.Module, half: bool = False) -> dict[str, Any]:
    """What a checkpoint stores under ``"reranker"`` for ``reranker`` paired with ``model``."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
        for k, v in reranker.state_dict().items()
    }
    return {
        "config": asdict(reranker.config),
        **asdict(reranker.shapes),
        "encoder_sha256": encoder_digest(model),
        "state_dict": state,
    }


def from_payload(saved: dict[str, Any], model: nn.Module, source: Path | str) -> Reranker:
    """The re-ranker stored in ``saved`` (a checkpoint's ``"reranker"``), checked against the
    dual encoder ``model`` it must belong to; a one-line EncoderError otherwise."""
    try:
        config = RerankerConfig(**saved["config"])
        shapes = Shapes(*(int(saved[k]) for k in Shapes.__dataclass_fields__))
        reranker = Reranker(config, shapes)
        reranker.load_state_dict(saved["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise EncoderError(f"{source} holds a re-ranker that cannot be read ({e!s:.150})") from None
    if saved.get("encoder_sha256") != encoder_digest(model):
        raise EncoderError(
            f"the re-ranker in {source} was trained with another dual encoder than the one "
            "loaded: use the checkpoint it was saved in, or train one for this model "
            "(retrieval train --itm)"
        )
    return reranker.to(next(model.parameters()).device).eval()


def load(checkpoint: Path | None, model: nn.Module) -> Reranker | None:
    """The re-ranker saved with ``model``'s checkpoint, or None when it has none."""
    if checkpoint is None:
        return None
    saved = read_checkpoint(checkpoint).get(KEY)
    return None if saved is None else from_payload(saved, model, checkpoint)
