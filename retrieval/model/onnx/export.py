"""Export a tower of a loaded open_clip model to an ONNX graph (torch.export, opset 18).

Each graph has a dynamic batch axis; the text graph also a dynamic sequence axis where cutting
the padding is exact, so that a query runs on its trimmed ids (`retrieval.model.tokens.trimmed`)
as it does in torch (other text towers: the full context length). Where the engine can read the
tower's tokens (`tokens.image_tokens` / `text_tokens`: open_clip ViTs, timm trunks, open_clip's
text transformers and Hugging Face towers) the graph outputs them beside the features, for the
re-ranker; any other tower is exported as its ``encode_image`` / ``encode_text`` alone. Every
graph is run once against torch on sizes it was not traced with before it is kept.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import EncoderError, first_line
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


@dataclass(frozen=True)
class Examples:
    """What the towers are traced with: prepared ``pixels`` (2, 3, H, W), token ids (2, L) as
    the tokenizer gives them, and the longest text it gives (the context length)."""

    pixels: torch.Tensor
    ids: torch.Tensor
    context_length: int

    def shapes(self) -> dict[str, list[int]]:
        """The sizes a graph is exported for (a cache key's part)."""
        return {"pixels": list(self.pixels.shape[1:]), "context": [self.context_length]}


def export_image(model: torch.nn.Module, examples: Examples, path: Path) -> None:
    """``model``'s image tower -> ``path``, checked against torch on one image."""
    pixels = examples.pixels
    tokens = _gives_tokens(lambda x: image_tokens(model, x), pixels)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    graph = _ImageGraph(model, tokens)
    _export(graph, pixels, IMAGE_INPUT, {0: batch}, tokens, path)
    _check(graph, path, IMAGE_INPUT, [pixels[:1]])


def export_text(model: torch.nn.Module, examples: Examples, path: Path) -> None:
    """``model``'s text tower -> ``path``, checked against torch on texts of one token and of
    the full context length. Its length axis is dynamic where trimming is exact (`trims`)."""
    ids, length = examples.ids, examples.context_length
    states = _gives_tokens(lambda x: text_tokens(model, x), ids)
    axes: dict[int, torch.export.Dim] = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    full = ids[:1].repeat(1, -(-length // ids.shape[1]))[:, :length]  # the context filled
    checks = [full]
    if trims(model):
        axes[1] = torch.export.Dim("length", min=1, max=length)
        ids, checks = trimmed(model, ids), [ids[:1, :1], full]
    graph = _TextGraph(model, states)
    _export(graph, ids, TEXT_INPUT, axes, states, path)
    _check(graph, path, TEXT_INPUT, checks)


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
        raise EncoderError(
            f"could not export the model to ONNX ({first_line(e)}); use --runtime torch"
        ) from None


def _check(graph: torch.nn.Module, path: Path, name: str, inputs: list[torch.Tensor]) -> None:
    """Refuse a graph that does not give torch's features on ``inputs`` (sizes the export did
    not trace with: a dimension it fixed would fail or differ here, not in a user's query)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in inputs:
        with torch.inference_mode():
            out = graph(x)
        want = (out[0] if isinstance(out, tuple) else out).numpy()
        try:
            got = session.run([FEATURES], {name: x.numpy()})[0]
        except Exception as e:
            got, why = None, first_line(e)
        if got is not None and got.shape == want.shape:
            cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
            if float(cos.min()) > 1 - 1e-4:
                continue
            why = f"cosine {float(cos.min()):.5f} to torch"
        raise EncoderError(
            f"the ONNX export of the model does not reproduce it on input {tuple(x.shape)} "
            f"({why}); use --runtime torch"
        )


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
