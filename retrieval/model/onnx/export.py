"""Export a tower of a loaded open_clip model to an ONNX graph (torch.export, opset 18).

Each graph has a dynamic batch axis; the text graph also a dynamic sequence axis, so that a
query runs on its trimmed ids (`retrieval.model.tokens.trimmed`) as it does in torch. Where the
engine can read the tower's tokens (`tokens.image_tokens` / `text_tokens`: open_clip ViTs, timm
trunks, open_clip's text transformers and Hugging Face towers) the graph outputs them beside the
features, for the re-ranker; any other tower is exported as its ``encode_image`` /
``encode_text`` alone, at the full context length.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from ...errors import EncoderError
from ..tokens import image_tokens, text_tokens, trimmed, trims

log = logging.getLogger(__name__)

OPSET = 18
MAX_BATCH = 65536
IMAGE_INPUT, TEXT_INPUT = "pixels", "ids"
FEATURES, TOKENS = "features", "tokens"  # outputs: the pooled features; patches or states


class _ImageGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, tokens: bool) -> None:
        super().__init__()
        self.model, self.tokens = model, tokens

    def forward(self, pixels: torch.Tensor):
        return image_tokens(self.model, pixels) if self.tokens else self.model.encode_image(pixels)


class _TextGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, states: bool) -> None:
        super().__init__()
        self.model, self.states = model, states

    def forward(self, ids: torch.Tensor):
        if not self.states:
            return self.model.encode_text(ids)
        pooled, hidden, _ = text_tokens(self.model, ids)
        return pooled, hidden


def _gives_tokens(fn, example: torch.Tensor) -> bool:
    try:
        with torch.inference_mode():
            fn(example)
        return True
    except EncoderError:  # a tower whose tokens the engine cannot read: features only
        return False


def export_image(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """``model``'s image tower -> ``path``; ``example``: (B >= 2, 3, H, W) prepared pixels."""
    tokens = _gives_tokens(lambda x: image_tokens(model, x), example)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    _export(_ImageGraph(model, tokens), example, IMAGE_INPUT, {0: batch}, tokens, path)


def export_text(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """``model``'s text tower -> ``path``; ``example``: token ids (B >= 2, L), L between 2 and
    the context length (the tokenizer's full output, trimmed where the tower allows)."""
    states = _gives_tokens(lambda ids: text_tokens(model, ids), example) and trims(model)
    axes: dict[int, torch.export.Dim] = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    if states:
        axes[1] = torch.export.Dim("length", min=1, max=example.shape[1])
        example = trimmed(model, example)
    _export(_TextGraph(model, states), example, TEXT_INPUT, axes, states, path)


def _export(graph, example, name: str, axes: dict, tokens: bool, path: Path) -> None:
    outputs = [FEATURES, TOKENS] if tokens else [FEATURES]
    try:
        with _quiet(), torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                graph.eval(),
                (example,),
                None,
                input_names=[name],
                output_names=outputs,
                dynamic_shapes=(axes,),
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
            program.save(str(path), external_data=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EncoderError(
            f"could not export the model to ONNX ({first}); use --runtime torch"
        ) from None


@contextlib.contextmanager
def _quiet():
    """torch.onnx reports each stage on stdout and warns about what it decomposes: a user sees
    the engine's one log line instead."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield
