from __future__ import annotations

import numpy as np
import pytest
from badinputs import EXPECTED, make_catalogue

from retrieval.corpus.images import BadImage, load_image


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    return make_catalogue(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_bad_or_odd_file_is_rejected_with_its_reason_or_converted(catalogue, name):
    expected = EXPECTED[name]
    if expected is None:
        im = load_image(catalogue[name])
        assert im.mode == "RGB"
    else:
        with pytest.raises(BadImage) as err:
            load_image(catalogue[name])
        assert err.value.reason == expected


def test_exif_rotation_is_applied(catalogue):
    assert load_image(catalogue["rotated.jpg"]).size == (20, 40)


def test_sixteen_bit_gray_keeps_its_brightness(catalogue):
    # PIL's own conversion clips 16-bit values to white; mid-gray must stay mid-gray.
    px = np.asarray(load_image(catalogue["gray16.png"]))
    assert np.all(np.abs(px.astype(int) - 128) <= 1)


def test_transparency_is_composited_over_white(catalogue):
    assert np.asarray(load_image(catalogue["palette_alpha.png"]))[0, 0].tolist() == [255] * 3
    assert np.asarray(load_image(catalogue["rgba.png"]))[0, 0].tolist() == [255] * 3


def test_cmyk_becomes_rgb_colour(catalogue):
    r, g, b = np.asarray(load_image(catalogue["cmyk.jpg"]))[5, 5].tolist()
    assert r > 200 and g < 60 and b < 60  # C=0 M=255 Y=255 K=0 is red


def test_pixel_limit_is_configurable(catalogue):
    with pytest.raises(BadImage, match="too many pixels"):
        load_image(catalogue["gray.png"], max_pixels=100)
