"""Decoding images safely: one function that returns an RGB picture or a reason it cannot.

Everything a user's folder may hold is handled here, so the rest of the engine only ever sees
8-bit RGB images the right way up: missing and empty files, corrupt or truncated data, files
that are not images, decompression bombs, and the odd modes (CMYK, 16-bit, palette with
transparency, grayscale) and EXIF orientations real photo collections contain.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import webdataset

# A photo of 40 MP is large but real; past that we refuse rather than risk decompressing a bomb.
DEFAULT_MAX_PIXELS = 40_000_000
_BACKGROUND = (255, 255, 255)


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is a short, stable label for reports."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` and return it as an upright 8-bit RGB image, or raise `BadImage`.

    ``path`` may also be a reference to a member of a WebDataset tar (see
    `retrieval.corpus.webdataset`).
    """
    data = _member_bytes(path)
    if data is not None:
        return decode(io.BytesIO(data), max_pixels=max_pixels, name=str(path))
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage("missing file", str(path)) from None
    except OSError as e:
        raise BadImage("unreadable file", str(e)) from None
    if not path.is_file():
        raise BadImage("not a file", str(path))
    if size == 0:
        raise BadImage("empty file", str(path))
    with path.open("rb") as f:
        return decode(f, max_pixels=max_pixels, name=str(path))


def _member_bytes(path: str | Path) -> bytes | None:
    """The bytes of a tar member reference, None for a plain path; problems as `BadImage`."""
    try:
        data = webdataset.member_bytes(path)
    except FileNotFoundError:
        raise BadImage("missing file", str(webdataset.backing_file(path))) from None
    except EOFError as e:  # the shard was truncated or rewritten since it was read
        raise BadImage("corrupt image", str(e)) from None
    except OSError as e:
        raise BadImage("unreadable file", str(e)) from None
    if data is not None and not data:
        raise BadImage("empty file", str(path))
    return data


def decode(fp, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "<bytes>") -> Image.Image:
    """Decode a binary file object (see `load_image`); used for uploads too."""
    try:
        with warnings.catch_warnings():
            # PIL warns before its own bomb limit; we apply ours explicitly below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage("too many pixels", f"{w}x{h} > {max_pixels} ({name})")
            im.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image", name) from None
    except Image.DecompressionBombError as e:
        raise BadImage("too many pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # PIL raises OSError("image file is truncated ...") and friends for damaged data.
        raise BadImage("corrupt image", f"{name}: {e}") from None
    # A broken EXIF block must not lose an otherwise good photo.
    with contextlib.suppress(Exception):
        im = ImageOps.exif_transpose(im) or im
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited over white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, _BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    # PIL's own convert("L") clips 16-bit values at 255, which turns most photos white.
    arr = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        lo, hi = arr.min(initial=0.0), arr.max(initial=0.0)
        arr, top = arr - lo, max(hi - lo, 1e-12)
    else:
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")
