"""Which runtime runs the towers: PyTorch eager (``torch``) or ONNX Runtime (``onnx``), and at
which precision (``fp32``, or ``int8``: ONNX Runtime's dynamic quantisation of the weight matrix
products, `retrieval.model.onnx`).

Light on purpose (no torch): the command line, configs and the manifest name runtimes through
it; `retrieval.model.encoder` is what runs one. A manifest records the runtime its index was
built with; later commands follow it unless told otherwise (`RuntimeChoice.over`). On a CUDA
device the encoder always runs torch with autocast: ONNX Runtime is the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EncoderError

ENGINES = ("torch", "onnx")
PRECISIONS = ("fp32", "int8")
ONNX_EXTRA = "onnx"  # the optional extra holding onnx and onnxruntime
ONNX_HINT = f"pip install 'retrieval[{ONNX_EXTRA}]'"


@dataclass(frozen=True)
class Runtime:
    """A runtime and precision, both known. ``int8`` exists on ONNX Runtime only."""

    engine: str = "torch"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise EncoderError(f"unknown runtime {self.engine!r} (known: {', '.join(ENGINES)})")
        if self.precision not in PRECISIONS:
            known = ", ".join(PRECISIONS)
            raise EncoderError(f"unknown precision {self.precision!r} (known: {known})")
        if self.engine == "torch" and self.precision != "fp32":
            raise EncoderError(
                f"--precision {self.precision} runs on ONNX Runtime: add --runtime onnx"
            )

    def __str__(self) -> str:
        return f"{self.engine} {self.precision}"

    def to_json(self) -> dict[str, str]:
        return {"engine": self.engine, "precision": self.precision}

    @classmethod
    def from_json(cls, d: dict[str, str] | None) -> Runtime:
        """A manifest's record; None (written before runtimes existed): torch fp32."""
        return cls(**d) if d else cls()


TORCH_FP32 = Runtime()  # open_clip as trained: what the others are measured against
DEFAULT_RUNTIME = TORCH_FP32  # what `build` encodes with when not told (benchmarks/README.md)
ALL_RUNTIMES = (TORCH_FP32, Runtime("onnx", "fp32"), Runtime("onnx", "int8"))


@dataclass(frozen=True)
class RuntimeChoice:
    """What a command asked for: either part may be left out (None), to follow the index."""

    engine: str | None = None
    precision: str | None = None

    @property
    def given(self) -> bool:
        return self.engine is not None or self.precision is not None

    def over(self, base: Runtime = DEFAULT_RUNTIME) -> Runtime:
        """This choice with what it leaves out taken from ``base`` (an index's own runtime, or
        the default): ``--precision int8`` alone means ONNX Runtime, ``--runtime`` alone keeps
        the base's precision where that runtime has it."""
        engine = self.engine or ("onnx" if self.precision == "int8" else base.engine)
        precision = self.precision or (base.precision if engine == base.engine else "fp32")
        return Runtime(engine, precision)


FOLLOW_INDEX = RuntimeChoice()  # nothing asked: the index's runtime (a build: the default)
