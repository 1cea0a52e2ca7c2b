"""Contact sheets: search results as one picture of thumbnails with rank, score and caption.

For people who search from a shell: ``retrieval search ... --grid results.png``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..corpus.images import BadImage, load_image

_PAD = 8
_LINE = 13  # px per text line with PIL's default bitmap font
_BG, _INK, _FAINT = (255, 255, 255), (25, 25, 25), (110, 110, 110)


def sheet_format(out: Path) -> str:
    """The image format that ``out``'s extension names; ValueError when it names none."""
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"{out}: a contact sheet needs an image file name (.png, .jpg, .webp)")
    return fmt


def contact_sheet(
    results: list[dict[str, Any]],
    out: str | Path,
    thumb: int = 160,
    columns: int = 5,
    caption_lines: int = 3,
) -> Path:
    """Write ``results`` (the ``"results"`` of a search) as an image grid to ``out``, in the
    format its extension names (.png, .jpg, .webp, ...).

    Each cell shows the image (a grey "missing" box when its file cannot be read), then
    ``#rank  score`` and the matched caption (or the item's first one), wrapped to the cell.
    """
    out = Path(out)
    fmt = sheet_format(out)
    columns = max(1, min(columns, len(results) or 1))
    rows = max(1, -(-len(results) // columns))
    cell_w, cell_h = thumb + 2 * _PAD, thumb + 2 * _PAD + (1 + caption_lines) * _LINE
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), _BG)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    chars = max(8, thumb // 6)  # the default font is ~6 px per character
    for i, r in enumerate(results):
        x, y = (i % columns) * cell_w + _PAD, (i // columns) * cell_h + _PAD
        sheet.paste(_thumbnail(r.get("path"), thumb), (x, y))
        ty = y + thumb + 2
        draw.text((x, ty), f"#{r['rank']}  {r['score']:.3f}", fill=_INK, font=font)
        caption = r["caption"]["text"] if r.get("caption") else (r.get("captions") or [""])[0]
        lines = textwrap.wrap(caption, chars)[:caption_lines]
        for j, line in enumerate(lines, 1):
            draw.text((x, ty + j * _LINE), line, fill=_FAINT, font=font)
    if not results:
        draw.text((_PAD, _PAD), "(no results)", fill=_FAINT, font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format=fmt)
    return out


def _thumbnail(path: str | None, size: int) -> Image.Image:
    """The image fitted into a ``size`` square, centred; a grey box when it cannot be read."""
    cell = Image.new("RGB", (size, size), (235, 235, 235))
    try:
        im = load_image(path) if path else None
    except BadImage:
        im = None
    if im is None:
        ImageDraw.Draw(cell).text((6, size // 2 - 6), "image missing", fill=_FAINT)
        return cell
    # Upscale small images too (the demo's are 64 px): nearest keeps shapes crisp.
    scale = size / max(im.size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
    cell.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return cell
