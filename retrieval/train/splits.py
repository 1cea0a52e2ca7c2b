"""Where a tower splits into a locked part and what trains after it (`Side`).

A fully locked tower splits at its projection (open_clip's TimmModel: ``visual.head``; its Hugging
Face text tower: ``text.proj``), or is locked whole. A partly open one splits at its first open
module where its forward is known to be split there: a timm EfficientNet trunk after its locked
stem and blocks (`TrunkRest` runs the open end), a mean-pooled BERT text tower after its locked
embeddings and layers (`MaskedSide` keeps the token mask beside the hidden states, `TextRest`
runs the open layers, the pooling and the projection). Any other partly open tower has no split:
it runs live. `retrieval.train.feature_cache` stores what the locked parts compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from ..model.checkpoints import state_digest
from .locking import frozen


@dataclass
class Side:
    """A tower's locked part and what follows it: ``run`` (model input -> the tower's output,
    unnormalised), ``head`` (the trained rest, from the locked part's output; None when the
    whole tower is locked), the locked part's weights, and ``entry``: the module whose input
    the locked part's output is in the live forward (``head`` itself when None)."""

    run: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor] | None
    locked: dict[str, torch.Tensor]
    entry: torch.nn.Module | None = None

    @property
    def partial(self) -> bool:
        """The locked part ends inside the tower's trunk (its outputs are feature maps)."""
        return self.entry is not None

    @cached_property
    def digest(self) -> str:
        """The locked weights' digest: they do not change during the run (that is the lock)."""
        return state_digest(self.locked)

    def locked_part(self, x: torch.Tensor) -> torch.Tensor:
        """What the head receives for input ``x`` in the live forward (the tower's own output
        when there is no head). The forward stops there: the open part does not run, so its
        BatchNorm statistics do not move."""
        if self.head is None:
            return self.run(x)
        entry = self.entry if self.entry is not None else self.head

        def stop(module: torch.nn.Module, args: tuple) -> None:
            raise _Reached(args[0])

        hook = entry.register_forward_pre_hook(stop)
        try:
            self.run(x)
        except _Reached as reached:
            return reached.value
        finally:
            hook.remove()
        raise RuntimeError("the tower's forward never reached its head")  # a wrong split


class _Reached(Exception):
    """Carries the head's input out of a forward stopped there."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


class TrunkRest:
    """The open end of a timm EfficientNet trunk, then its pooling and open_clip's head: what a
    live forward computes from the input of ``modules[0]``. The modules are the model's own."""

    def __init__(self, trunk: torch.nn.Module, modules: list[torch.nn.Module], head) -> None:
        self.trunk, self.modules, self.head = trunk, modules, head

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # as the live trunk runs (towers)
        for module in self.modules:
            x = module(x)
        return self.head(self.trunk.forward_head(x))


def _forward_order(trunk: torch.nn.Module) -> list[torch.nn.Module] | None:
    """A timm EfficientNet trunk's modules in its ``forward_features`` order; None for any
    other trunk, whose forward this module does not split."""
    try:
        from timm.models.efficientnet import EfficientNet
    except ImportError:
        return None
    if type(trunk) is not EfficientNet:  # a subclass may forward otherwise
        return None
    blocks = [block for stage in trunk.blocks for block in stage]
    return [trunk.conv_stem, trunk.bn1, *blocks, trunk.conv_head, trunk.bn2]


def _partial_image_side(model: torch.nn.Module) -> Side | None:
    """A partly open trunk's split at its first open module, where the trunk allows one."""
    trunk, head = model.visual.trunk, model.visual.head
    order = _forward_order(trunk)
    first = next((i for i, m in enumerate(order or []) if not frozen(m)), None)
    if not first:  # not such a trunk, all open, or (None) all locked
        return None
    locked = {f"{i}.{k}": v for i, m in enumerate(order[:first]) for k, v in m.state_dict().items()}
    rest = TrunkRest(trunk, order[first:], head)
    return Side(model.encode_image, rest, locked, entry=order[first])


def image_side(model: torch.nn.Module, locked: bool = True) -> Side | None:
    """The image tower's split; None when ``locked`` and its locked part has open weights (a
    partly open EfficientNet trunk is split at its first open module)."""
    visual = model.visual
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if trunk is not None and head is not None:  # open_clip's TimmModel: head(trunk(x))
        if not locked or frozen(trunk):
            return Side(model.encode_image, head, trunk.state_dict())
        return _partial_image_side(model)
    side = Side(model.encode_image, None, visual.state_dict())
    return side if frozen(visual) or not locked else None


class MaskedSide(Side):
    """A Hugging Face text tower split between its layers: the locked part's output is the
    hidden states (B, L, H) entering the first open layer, packed with the token mask as one
    more channel (B, L, H + 1), which the open layers and the mean pooling need."""

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module], first: int) -> None:
        text = model.text
        locked = {
            f"{i}.{k}": v
            for i, m in enumerate([text.transformer.embeddings, *layers[:first]])
            for k, v in m.state_dict().items()
        }
        super().__init__(model.encode_text, TextRest(text, layers[first:]), locked, layers[first])
        self.pad = text.config.pad_token_id

    def locked_part(self, x: torch.Tensor) -> torch.Tensor:
        hidden = super().locked_part(x)
        mask = (x != self.pad).to(hidden.dtype)  # as open_clip's HFTextEncoder masks
        return torch.cat([hidden, mask.unsqueeze(-1)], dim=-1)


class TextRest:
    """The open layers of a BERT-style text tower, its pooling and projection, from packed
    hidden states and mask (`MaskedSide`): what the live forward computes from there."""

    def __init__(self, text: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
        self.text, self.layers = text, layers

    def __call__(self, packed: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask
        from transformers.modeling_outputs import BaseModelOutput

        hidden, mask = packed[..., :-1], packed[..., -1].long()
        config = self.text.transformer.config
        extended = create_bidirectional_mask(
            config=config, inputs_embeds=hidden, attention_mask=mask
        )
        for layer in self.layers:
            out = layer(hidden, extended)
            hidden = out[0] if isinstance(out, tuple) else out
        pooled = self.text.pooler(BaseModelOutput(last_hidden_state=hidden), mask)
        return self.text.proj(pooled)


def _partial_text_side(model: torch.nn.Module) -> Side | None:
    """A mean-pooled BERT-style tower whose embeddings and first layers are locked, split at
    its first open layer; None for any other (it runs live)."""
    text = model.text
    body = text.transformer
    layers = list(getattr(getattr(body, "encoder", None), "layer", None) or [])
    if not layers or not hasattr(body, "embeddings") or type(text.pooler).__name__ != "MeanPooler":
        return None
    try:
        from transformers.masking_utils import create_bidirectional_mask  # noqa: F401
    except ImportError:  # transformers < 5: another layer API; run live
        return None
    first = next((i for i, m in enumerate(layers) if not frozen(m)), None)
    if not first or not frozen(body.embeddings):
        return None
    return MaskedSide(model, layers, first)


def text_side(model: torch.nn.Module, locked: bool = True) -> Side | None:
    """The text tower's split; None when ``locked`` and its locked part has open weights (a
    partly open mean-pooled BERT tower is split at its first open layer)."""
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "proj"):
        # open_clip's HFTextEncoder: proj(pooler(transformer(ids)))
        body = text.transformer
        if not locked or frozen(body):
            return Side(model.encode_text, text.proj, body.state_dict())
        return _partial_text_side(model)
    # open_clip's own text tower: on the model itself (CLIP) or as model.text (CustomTextCLIP).
    own = ("visual.", "logit_")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(own)}
    is_locked = not any(
        p.requires_grad for n, p in model.named_parameters() if not n.startswith(own)
    )
    side = Side(model.encode_text, None, state)
    return side if is_locked or not locked else None
