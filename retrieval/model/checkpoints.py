"""Model weight files: reading a checkpoint (open_clip's layout) and exporting one for use.

A checkpoint is ``{"epoch", "name", "state_dict"}`` as ``retrieval train`` writes it and
``open_clip.create_model_and_transforms(name, pretrained=path)`` reads it; a bare state dict is
accepted too. Anything else is a one-line `EncoderError`, never a torch traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import EncoderError
from ..files import atomic_write


def save_checkpoint(obj: Any, path: Path) -> None:
    """``torch.save`` that replaces ``path`` all or nothing (see `retrieval.files`)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def read_checkpoint(path: Path) -> dict:
    """Checkpoint file ``path`` as ``{"state_dict": {name: tensor}, ...}`` (open_clip's layout;
    a bare state dict is wrapped); a one-line EncoderError for anything else."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding more than plain data
        raise EncoderError(f"{path} is not a model checkpoint ({type(e).__name__})") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not state or not isinstance(state, dict) or not all(map(torch.is_tensor, state.values())):
        raise EncoderError(
            f"{path} holds no model weights (a training-state file? give epoch_N.pt, latest.pt "
            "or best.pt, not a .state.pt)"
        )
    return ckpt if state is not ckpt else {"state_dict": state}


def export_checkpoint(src: Path, dst: Path, half: bool = True) -> Path:
    """Write model weights only (no optimizer), fp16 by default: half the size, same format.

    open_clip loads fp16 tensors into an fp32 model by copying, so the file stays loadable
    by ``open_clip.create_model_and_transforms(name, pretrained=dst)``.
    """
    ckpt = read_checkpoint(src)
    state = {
        k.removeprefix("module."): (v.half() if half and v.is_floating_point() else v)
        for k, v in ckpt["state_dict"].items()
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        {"epoch": ckpt.get("epoch"), "name": ckpt.get("name"), "state_dict": state}, dst
    )
    return dst
