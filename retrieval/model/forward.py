"""One forward pass through a tower, whatever runs it: the seam between `Encoder` (batching,
decoding, the embedding contract) and the runtime (`retrieval.model.runtime`).

`TorchForward` runs the open_clip model itself (autocast on CUDA); `retrieval.model.onnx`'s
`OnnxForward` runs the same towers exported to ONNX Runtime. Both take what the tower takes
(pixels (B, 3, H, W) float32; token ids (B, L) int64, already `tokens.trimmed`) and give torch
tensors: the pooled features (B, E), unnormalised, and when asked the tokens the re-ranker reads
(patches (B, P, W); text states (B, L, W)).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import torch

from .tokens import image_tokens, text_tokens, trims


class Forward(Protocol):
    def image(self, pixels: torch.Tensor, tokens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pixels (B, 3, H, W) -> (features (B, E); patch tokens (B, P, W) if ``tokens``)."""
        ...

    def text(self, ids: torch.Tensor, states: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (B, L) -> (features (B, E); token states (B, L, W) if ``states``)."""
        ...


class TorchForward:
    """The open_clip model in PyTorch eager mode; bfloat16/float16 autocast on CUDA."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device

    def _autocast(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def image(self, pixels: torch.Tensor, tokens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._autocast():
            if tokens:
                return image_tokens(self.model, pixels)
            return self.model.encode_image(pixels), None

    def text(self, ids: torch.Tensor, states: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._autocast():
            if not states and not trims(self.model):  # a tower that reads its padding
                return self.model.encode_text(ids), None
            pooled, hidden, _ = text_tokens(self.model, ids)
            return pooled, hidden if states else None
