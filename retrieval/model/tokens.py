"""Token outputs of an open_clip model's towers: what the re-ranker reads besides the embeddings.

The dual encoder pools each tower's sequence into one vector; the re-ranker
(`retrieval.model.reranker`) attends over the sequences themselves: the image tower's patch
tokens and the text tower's token states. open_clip exposes them through a tower's
``output_tokens`` switch, but flipping it on a shared model would race a concurrent query, so
each function here runs the tower's own steps and returns the pooled features and the tokens of
the same forward pass:

- image: a `VisionTransformer` (patch tokens after its final norm, class token left out) or a
  timm trunk (its last feature map, one token per position);
- text: open_clip's built-in text tower, a `TextTransformer`, or a Hugging Face tower (token
  states after the final norm; a mask marks the padding).

Any other tower is refused in one line.
"""

from __future__ import annotations

import torch
from open_clip.model import text_global_pool
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer

from ..errors import EncoderError


def image_tokens(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels (B, 3, H, W) -> (pooled features (B, E), unnormalised; tokens (B, P, W))."""
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        x = visual.transformer(visual._embeds(pixels))
        pooled, tokens = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, tokens
    if isinstance(visual, TimmModel):
        fmap = visual.trunk.forward_features(pixels)
        pooled = visual.head(visual.trunk.forward_head(fmap))
        if fmap.ndim == 4:  # (B, C, H, W): one token per position
            fmap = fmap.flatten(2).transpose(1, 2)
        return pooled, fmap
    raise EncoderError(
        f"the re-ranker needs the image tower's tokens, and {type(visual).__name__} towers do not "
        "give them (supported: open_clip ViTs and timm trunks)"
    )


def text_tokens(
    model: torch.nn.Module, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (B, L) -> (pooled features (B, E), unnormalised; states (B, L, W); mask (B, L)
    bool, True where a token is text, False for padding)."""
    text = getattr(model, "text", None)
    if text is None and hasattr(model, "token_embedding"):  # open_clip's built-in text tower
        return _builtin_text(model, tokens)
    if isinstance(text, TextTransformer) and text.cls_emb is None:
        x, attn_mask = text._embeds(tokens)
        x = text.ln_final(text.transformer(x, attn_mask=attn_mask))
        pooled = text_global_pool(x, tokens, text.pool_type, getattr(text, "eos_id", None))
        pooled = _project(pooled, text.text_projection)
        return pooled, x, tokens != text.pad_id
    if type(text).__name__ == "HFTextEncoder":
        mask = tokens != text.config.pad_token_id
        out = text.transformer(input_ids=tokens, attention_mask=mask.long())
        pooled = text.proj(text.pooler(out, mask.long()))
        return pooled, out.last_hidden_state, mask
    raise EncoderError(
        f"the re-ranker needs the text tower's token states, and {type(text).__name__} towers "
        "do not give them (supported: open_clip's text transformers and Hugging Face towers)"
    )


def _builtin_text(model: torch.nn.Module, tokens: torch.Tensor):
    """`open_clip.CLIP.encode_text`, keeping the states it pools."""
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    eos = getattr(model, "text_eos_id", None)
    pooled = _project(text_global_pool(x, tokens, model.text_pool_type, eos), model.text_projection)
    return pooled, x, tokens != 0  # open_clip's tokenizer pads with 0


def _project(pooled: torch.Tensor, projection) -> torch.Tensor:
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection
