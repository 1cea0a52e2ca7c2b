"""`OnnxForward`: a model's towers run by ONNX Runtime, from the cached graphs.

int8 texts run one at a time, each at its own length. Dynamic quantisation scales a matrix
product's activations by the range of the whole input tensor, so a text quantised within a batch
depends on the other texts and their padding: MiniLM's caption embeddings moved to a cosine of
0.991 (min 0.982) between alone and in a batch of 128, as far as int8 is from fp32. Alone, a
caption is indexed exactly as it is later queried, and a served query does not depend on the
requests batched with it; 3.2 ms a caption. Images stay batched, in runs of `IMAGES_PER_RUN`:
ViT-B-32's embeddings move by less than 2e-4 of cosine between alone and in a batch of 32, and
one at a time costs 15% of the images/s.

Threads: one session per tower, each with intra-op threads = the cores this process may use,
sequential execution, and worker threads that sleep instead of spinning when idle, so that the
image-decoding processes of a build (cores - 1 of them) get the cores back between batches
instead of competing with spinning threads: ViT-B-32 int8 at 57.8 images/s sleeping, 51.0
spinning (benchmarks/README.md, "ONNX Runtime encoders").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ...errors import EncoderError, first_line
from ..runtime import ONNX_HINT
from ..tokens import trimmed
from . import export
from .cache import GraphCache, cache_root, graph_key
from .quantize import quantize

log = logging.getLogger(__name__)

# Images a session run takes at most: a build's batch of 64 runs as 4 of 16, whose activations
# stay in the cache (ViT-B-32 int8: 57.8 images/s against 50.3 in one run of 64; 8: 56.3).
IMAGES_PER_RUN = 16


def _onnxruntime():
    try:
        import onnx  # noqa: F401  (the exporter writes with them)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError:
        raise EncoderError(f"--runtime onnx needs onnx and onnxruntime: {ONNX_HINT}") from None
    return onnxruntime


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers set), shared with
    the other processes torchrun started on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def session_options(ort):
    options = ort.SessionOptions()
    options.intra_op_num_threads = usable_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites
    return options


class OnnxForward:
    """The `retrieval.model.forward.Forward` of ONNX Runtime sessions (CPU)."""

    def __init__(self, image, text, precision: str, trim) -> None:
        self.image_session, self.text_session, self.precision = image, text, precision
        self.trim = trim  # token ids (B, L) -> (B, l) without the padding after the longest
        self._image_outputs = [o.name for o in image.get_outputs()]
        self._text_outputs = [o.name for o in text.get_outputs()]

    @classmethod
    def load(
        cls, model: torch.nn.Module, name: str, examples: export.Examples, precision: str
    ) -> OnnxForward:
        """Sessions for ``model`` (open_clip name or config path ``name``) at ``precision``,
        from the cache or exported now, traced with ``examples``."""
        ort = _onnxruntime()
        key = graph_key(model, name, examples.shapes())
        cache = GraphCache(cache_root() / "onnx" / key)
        with cache.locked():
            image = _graph(
                cache, "image", precision, lambda p: export.export_image(model, examples, p)
            )
            text = _graph(
                cache, "text", precision, lambda p: export.export_text(model, examples, p)
            )
        options, providers = session_options(ort), ["CPUExecutionProvider"]
        try:
            sessions = [
                ort.InferenceSession(str(p), options, providers=providers) for p in (image, text)
            ]
        except Exception as e:  # verified bytes that still do not load: a runtime mismatch
            raise EncoderError(
                f"ONNX Runtime cannot load the graphs in {image.parent} ({first_line(e)}); delete "
                "that folder to export them again"
            ) from None
        return cls(*sessions, precision, lambda ids: trimmed(model, ids))

    def image(self, pixels: torch.Tensor, tokens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = []
        for start in range(0, len(pixels), IMAGES_PER_RUN):
            feed = {export.IMAGE_INPUT: _array(pixels[start : start + IMAGES_PER_RUN], np.float32)}
            parts.append(self._run(self.image_session, self._image_outputs, feed, tokens, "image"))
        pooled = torch.cat([p for p, _ in parts])
        return pooled, (torch.cat([t for _, t in parts]) if tokens else None)

    def text(self, ids: torch.Tensor, states: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.precision == "fp32" or len(ids) == 1:
            feed = {export.TEXT_INPUT: _array(ids, np.int64)}
            return self._run(self.text_session, self._text_outputs, feed, states, "text")
        rows = [self.text(self.trim(ids[i : i + 1]), states) for i in range(len(ids))]
        pooled = torch.cat([p for p, _ in rows])
        if not states:
            return pooled, None
        length = ids.shape[1]  # each text's states padded back to the batch's length
        padded = [torch.nn.functional.pad(h, (0, 0, 0, length - h.shape[1])) for _, h in rows]
        return pooled, torch.cat(padded)

    @staticmethod
    def _run(session, outputs: list[str], feed, tokens: bool, tower: str):
        if tokens and export.TOKENS not in outputs:
            raise EncoderError(
                f"the re-ranker needs the {tower} tower's tokens, and this model's ONNX graph does "
                "not give them (its tower is not one the engine reads tokens from)"
            )
        wanted = outputs if tokens else [export.FEATURES]
        try:
            got = [torch.from_numpy(a) for a in session.run(wanted, feed)]
        except Exception as e:  # onnxruntime's own exception classes
            raise EncoderError(
                f"ONNX Runtime failed on the {tower} tower: {first_line(e)}"
            ) from None
        return got[0], (got[1] if tokens else None)


def _array(t: torch.Tensor, dtype) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu").contiguous().numpy(), dtype=dtype)


def _graph(cache: GraphCache, tower: str, precision: str, export_fp32) -> Path:
    """The verified graph of ``tower`` at ``precision``: cached, else made (a bar shows it, as
    a first export takes from seconds to a minute)."""

    def made(step: str, make):
        def run(path: Path) -> None:
            with tqdm(total=1, desc=f"ONNX {step}: {tower} tower (once for these weights)") as bar:
                make(path)
                bar.update()
            log.info("%s the %s tower, cached in %s", step, tower, cache.folder)

        return run

    fp32 = lambda: cache.get(f"{tower}.fp32.onnx", made("export", export_fp32))  # noqa: E731
    if precision == "fp32":
        return fp32()
    to_int8 = made(f"{precision} quantisation", lambda path: quantize(fp32(), path))
    return cache.get(f"{tower}.{precision}.onnx", to_int8)
