"""Locked towers (LiT): weights that neither learn nor compute anything else while the rest trains.

open_clip's ``lock_image_tower`` / ``lock_text_tower`` only stop gradients. In train mode a locked
timm trunk's BatchNorm still normalises with each batch's statistics and moves its running ones,
and a locked Hugging Face tower still applies dropout: the "locked" tower computes something else
every step and is not the same network after training. open_clip's remedy, ``freeze_bn_stats``,
swaps timm's ``BatchNormAct2d`` for a ``FrozenBatchNorm2d`` that drops the activation, so the
features explode. Here every submodule whose parameters are all frozen is put in eval mode for
good instead: its ``train()`` no longer changes its mode, so the per-epoch ``model.train()`` and
validation's ``eval()``/``train()`` leave it computing exactly what the pretrained one computes,
and no module is swapped (the checkpoint keys stay open_clip's).
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch

log = logging.getLogger(__name__)

_PINNED = "_retrieval_locked"  # marks a module pinned in eval mode by `pin_frozen`


def lock_towers(model: torch.nn.Module, image: int | None, text: int | None) -> list[str]:
    """Lock the image tower but its last ``image`` groups and the text tower but its last
    ``text`` layers (None: leave the tower open); return the names of the modules pinned."""
    # open_clip prints ("Unlocking 2/7 layers of hf model"); a library logs.
    with contextlib.redirect_stdout(io.StringIO()) as said:
        if image is not None:
            model.lock_image_tower(unlocked_groups=image)
        if text:
            _lock_text_layers(model, text)
        elif text is not None:
            model.lock_text_tower(unlocked_layers=text)
    if said.getvalue().strip():
        log.info("%s", said.getvalue().strip())
    return pin_frozen(model)


def _lock_text_layers(model: torch.nn.Module, unlocked: int) -> None:
    """Lock the text tower but its last ``unlocked`` layers.

    open_clip's own partial lock of a Hugging Face tower looks the layers up in a table that
    has no entry for BERT (all-MiniLM-L6-v2: a KeyError), so that case is done here the same
    way: the embeddings and the layers before the last ``unlocked`` are locked.
    """
    body = getattr(getattr(model, "text", None), "transformer", None)
    layers = getattr(getattr(body, "encoder", None), "layer", None)
    if body is None or layers is None or not hasattr(body, "embeddings"):
        model.lock_text_tower(unlocked_layers=unlocked)  # open_clip's own towers
        return
    for module in [body.embeddings, *layers][:-unlocked]:
        module.requires_grad_(False)


def pin_frozen(model: torch.nn.Module) -> list[str]:
    """Put each largest submodule whose parameters are all frozen in eval mode for good.

    Only whole frozen subtrees: a parameter-free module inside a trained one (a dropout between
    open layers) keeps following the model's mode.
    """
    pinned: list[str] = []

    def visit(name: str, module: torch.nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            _stay_eval(module)
            pinned.append(name)
            return
        for child, sub in module.named_children():
            visit(f"{name}.{child}" if name else child, sub)

    visit("", model)
    return pinned


def _stay_eval(module: torch.nn.Module) -> None:
    module.eval()
    for m in module.modules():
        # An instance attribute wins over nn.Module.train, which a parent's train() calls on
        # each child: the whole subtree keeps eval mode whatever is asked of its ancestors.
        m.train = _keep_mode.__get__(m)
        setattr(m, _PINNED, True)


def _keep_mode(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    return self


def is_pinned(module: torch.nn.Module) -> bool:
    return bool(getattr(module, _PINNED, False))


def trained_keys(model: torch.nn.Module) -> list[str]:
    """The state-dict keys that training can change: parameters that learn, and the buffers of
    modules not pinned (BatchNorm statistics of open groups). The rest is as loaded."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    pinned = [f"{n}." for n, m in model.named_modules() if n and is_pinned(m)]
    return [k for k in model.state_dict() if k not in frozen and not k.startswith(tuple(pinned))]


def frozen(module: torch.nn.Module) -> bool:
    """Every parameter of ``module`` is locked (and it has some)."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)
