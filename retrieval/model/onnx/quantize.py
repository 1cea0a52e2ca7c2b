"""int8 graphs: ONNX Runtime's dynamic quantisation of an exported fp32 graph.

What is quantised, and why (benchmarks/README.md, "ONNX Runtime encoders", has the figures):

- **The matrix products with a weight operand** (``MatMul`` whose second input is a constant:
  every linear layer, attention's input and output projections, the MLPs, the final
  projection). Weights become int8 per output channel, activations uint8 per tensor, computed
  at run time. ViT-B-32's image tower: 2.2-2.5x the images/s of fp32.
- **Not attention's activation-by-activation products** (queries x keys, weights x values):
  quantising both operands at run time gave no speed (43.0 against 43.8 images/s, ViT-B-32)
  and a lower cosine to fp32.
- **Not convolutions**: ONNX Runtime's dynamic ``ConvInteger`` made EfficientNet-Lite0's trunk
  15x slower (11.8 against 172 images/s) and moved its embeddings to a cosine of 0.97.
- **Per channel**, not per tensor: MiniLM's text tower keeps a mean cosine of 0.991 to fp32
  against 0.958 per tensor, at the same speed.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from ...errors import EncoderError, first_line

QUANTISED_OPS = ("MatMul",)


def quantize(source: Path, target: Path) -> None:
    """The int8 graph of the fp32 graph ``source``, written to ``target``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with _quiet():
            # Given a path, the quantiser writes its shape-inferred copy beside the source, which
            # a second process quantising the same cached graph would read half-written.
            quantize_dynamic(
                onnx.load(str(source)),
                target,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=list(QUANTISED_OPS),
                extra_options={"MatMulConstBOnly": True},
            )
    except Exception as e:
        why = first_line(e)
        raise EncoderError(f"could not quantise the ONNX graph {source.name} ({why})") from None


@contextlib.contextmanager
def _quiet():
    """The quantiser logs each node it leaves alone, and advises pre-processing, on the root
    logger (graphs exported by `export` are already optimised by torch.onnx): the engine's log
    line says what was done instead."""
    root = logging.getLogger()
    hide = logging.Filter()
    hide.filter = lambda record: record.name != "root"
    root.addFilter(hide)
    try:
        yield
    finally:
        root.removeFilter(hide)
