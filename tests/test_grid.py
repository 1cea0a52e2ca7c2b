"""Contact sheets of search results."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from retrieval.serve.sheets import contact_sheet


def result(rank, path, caption="a red circle", score=0.5):
    return {
        "rank": rank,
        "id": f"i{rank}",
        "score": score,
        "path": str(path),
        "captions": [caption],
    }


def test_sheet_has_one_cell_per_result_with_the_image_in_it(tmp_path):
    red = write_image(tmp_path / "red.png", size=(40, 20), colour=(220, 0, 0))
    blue = write_image(tmp_path / "blue.jpg", size=(30, 30), colour=(0, 0, 220))
    results = [result(1, red), result(2, blue), result(3, tmp_path / "gone.png")]
    results[1]["caption"] = {"id": "c", "text": "the matched caption " * 5}
    out = contact_sheet(results, tmp_path / "sub" / "sheet.png", thumb=60, columns=2)
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    cell_w = 60 + 16
    assert sheet.shape[1] == 2 * cell_w and sheet.shape[0] > 2 * (60 + 16)
    # The thumbnail's centre pixel is the image's colour (upscaled, centred, in the cell).
    assert np.abs(sheet[8 + 30, 8 + 30] - [220, 0, 0]).max() < 10
    assert np.abs(sheet[8 + 30, cell_w + 8 + 30] - [0, 0, 220]).max() < 30
    # A missing file is a grey box, not a crash.
    row2 = sheet.shape[0] // 2 + 8
    assert (sheet[row2 + 5, 8 + 5] == 235).all()


def test_empty_results_still_write_a_picture(tmp_path):
    out = contact_sheet([], tmp_path / "none.png")
    assert Image.open(out).size[0] > 0


def test_the_file_name_sets_the_format_and_a_non_image_name_is_refused(tmp_path):
    red = write_image(tmp_path / "red.png", size=(20, 20), colour=(220, 0, 0))
    assert Image.open(contact_sheet([result(1, red)], tmp_path / "s.jpg")).format == "JPEG"
    assert Image.open(contact_sheet([result(1, red)], tmp_path / "s.webp")).format == "WEBP"
    for name in ("s.txt", "s"):
        with pytest.raises(ValueError, match="needs an image file name"):
            contact_sheet([result(1, red)], tmp_path / name)
    assert not (tmp_path / "s.txt").exists()
