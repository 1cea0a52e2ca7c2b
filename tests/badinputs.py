"""A catalogue of the bad and odd image files real collections contain, written on demand."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# name -> expected skip reason, or None when the image must be usable (converted to RGB)
EXPECTED = {
    "missing.jpg": "missing file",
    "empty.jpg": "empty file",
    "truncated.jpg": "corrupt image",
    "corrupt.png": "corrupt image",
    "text.jpg": "not an image",
    "bomb.png": "too many pixels",
    "cmyk.jpg": None,
    "gray16.png": None,
    "palette_alpha.png": None,
    "gray.png": None,
    "rotated.jpg": None,
    "rgba.png": None,
}


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def make_catalogue(folder: Path) -> dict[str, Path]:
    """Write every entry of `EXPECTED` (but the missing one) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "RGB")
    p = {name: folder / name for name in EXPECTED}
    p["empty.jpg"].write_bytes(b"")
    p["truncated.jpg"].write_bytes(_jpeg_bytes(noise)[:700])
    png = io.BytesIO()
    noise.save(png, format="PNG")
    data = bytearray(png.getvalue())
    start = data.index(b"IDAT") + 40
    data[start : start + 200] = bytes(200)  # zeroed compressed data: zlib must reject it
    p["corrupt.png"].write_bytes(bytes(data))
    p["text.jpg"].write_text("this is not a picture\n")
    Image.new("1", (9000, 9000)).save(p["bomb.png"])  # 81 MP in a few kB
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(p["cmyk.jpg"])
    gray16 = np.full((30, 40), 32768, dtype=np.uint16)
    Image.fromarray(gray16).save(p["gray16.png"])
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(p["palette_alpha.png"], transparency=1)
    Image.new("L", (40, 30), 90).save(p["gray.png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    p["rotated.jpg"].write_bytes(_jpeg_bytes(Image.new("RGB", (40, 20), (0, 0, 255)), exif=exif))
    Image.new("RGBA", (40, 30), (0, 255, 0, 0)).save(p["rgba.png"])
    return p
