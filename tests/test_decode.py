"""Decoding untrusted image bytes: odd modes to RGB, EXIF, JPEG draft, and every rejection."""

from __future__ import annotations

import io

import numpy as np
import pytest
from images import (
    ODD_CASES,
    bmp_image,
    cmyk_jpeg,
    encode,
    exif_rotated_jpeg,
    gray16_png,
    huge_png,
    la_png,
    palette_png,
    photo,
    photo_jpeg,
    rgba_png,
)
from PIL import Image, ImageFile

from data_pipeline.decode import DecodeError, decode_image, prepare_for_storage, validate_image


def pixel(img: Image.Image, x: int, y: int) -> tuple[int, int, int]:
    return img.getpixel((x, y))


def test_truncated_images_are_not_loaded_silently():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("name", sorted(ODD_CASES))
def test_every_odd_case_gets_its_expected_outcome(name):
    make, expected = ODD_CASES[name]
    data = make()
    if expected == "accepted":
        ext, width, height = validate_image(data)
        img = decode_image(data)
        assert img.mode == "RGB" and img.size == (width, height)
        assert ext == name.rsplit(".", 1)[1]
    else:
        with pytest.raises(DecodeError) as caught:
            validate_image(data)
        assert caught.value.reason == expected
        with pytest.raises(DecodeError) as caught:
            decode_image(data)
        assert caught.value.reason == expected


def test_photo_decodes_to_matching_pixels():
    original = photo("astronaut.png", (120, 100))
    img = decode_image(encode(original, quality=95))
    assert img.size == (120, 100) and img.mode == "RGB"
    error = np.abs(np.asarray(img, dtype=np.int16) - np.asarray(original, dtype=np.int16))
    assert error.mean() < 4


def test_cmyk_red_stays_red():
    r, g, b = pixel(decode_image(cmyk_jpeg((0, 255, 255, 0))), 10, 10)
    assert r > 220 and g < 40 and b < 40
    r, g, b = pixel(decode_image(cmyk_jpeg((255, 0, 255, 0))), 10, 10)  # cyan+yellow = green
    assert g > 220 and r < 40 and b < 40


@pytest.mark.parametrize("value,expected", [(0, 0), (0x8080, 128), (257 * 100, 100), (65535, 255)])
def test_16bit_gray_maps_to_8bit(value, expected):
    img = decode_image(gray16_png(value))
    assert img.mode == "RGB" and pixel(img, 3, 3) == (expected,) * 3


def test_palette_png_keeps_colors_and_transparency_becomes_white():
    img = decode_image(palette_png())
    assert pixel(img, 2, 2) == (0, 200, 0) and pixel(img, 30, 2) == (0, 0, 255)
    img = decode_image(palette_png(transparent_index=0))
    assert pixel(img, 2, 2) == (255, 255, 255) and pixel(img, 30, 2) == (0, 0, 255)


def test_alpha_is_composited_on_white():
    img = decode_image(rgba_png())
    assert pixel(img, 2, 2) == (255, 255, 255)  # alpha 0
    r, g, b = pixel(img, 30, 2)  # red at alpha 128 over white
    assert r == 255 and 120 <= g <= 135 and g == b
    img = decode_image(la_png())
    assert pixel(img, 2, 2) == (50, 50, 50) and pixel(img, 2, 30) == (255, 255, 255)


def test_exif_orientation_6_swaps_size_and_rotates_pixels():
    data = exif_rotated_jpeg(64, 32, orientation=6)
    assert validate_image(data) == ("jpg", 32, 64)
    img = decode_image(data)
    assert img.size == (32, 64)
    # stored left half (red) is the displayed top half after a 90 degree clockwise turn
    top, bottom = pixel(img, 16, 4), pixel(img, 16, 60)
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


def test_draft_decodes_jpeg_at_reduced_scale_but_not_below_request():
    data = encode(photo("retina.jpg", (1024, 768)))
    assert decode_image(data).size == (1024, 768)
    assert decode_image(data, draft_size=(200, 200)).size == (512, 384)  # scale 1/2: 768//200=3
    assert decode_image(data, draft_size=(100, 90)).size == (128, 96)  # scale 1/8
    assert decode_image(data, draft_size=(600, 600)).size == (1024, 768)  # cannot shrink
    png = encode(photo("retina.jpg", (256, 192)), "PNG")
    assert decode_image(png, draft_size=(32, 32)).size == (256, 192)  # draft is JPEG-only


def test_draft_respects_exif_rotation():
    img = photo("retina.jpg", (1024, 768))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(img, exif=exif.tobytes())
    # displayed 768x1024; asking (300, 500) displayed -> (500, 300) stored -> scale 1/2
    decoded = decode_image(data, draft_size=(300, 500))
    assert decoded.size == (384, 512)
    assert decoded.width >= 300 and decoded.height >= 500


def test_size_limits_are_parameters():
    data = photo_jpeg(size=(64, 48))
    with pytest.raises(DecodeError) as caught:
        decode_image(data, max_pixels=64 * 48 - 1)
    assert caught.value.reason == "too_large"
    assert decode_image(data, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(DecodeError) as caught:
        validate_image(data, max_pixels=10**8, min_side=49)
    assert caught.value.reason == "too_small"


def test_huge_header_rejected_before_any_pixel_is_decoded():
    # only 4 rows of pixel data exist: decoding would fail as "truncated"
    data = huge_png(11000, 11000, rows_present=4)
    with pytest.raises(DecodeError) as caught:
        decode_image(data)
    assert caught.value.reason == "too_large" and "121000000" in str(caught.value)
    # a limit above Pillow's own bomb warning threshold is honoured
    small_enough = huge_png(10000, 9000, rows_present=4)
    with pytest.raises(DecodeError) as caught:
        decode_image(small_enough, max_pixels=100_000_000)
    assert caught.value.reason == "truncated"


def test_bad_arguments_are_clear_errors():
    with pytest.raises(TypeError, match="bytes"):
        decode_image("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="draft_size"):
        decode_image(photo_jpeg(), draft_size=(0, 10))


def test_storage_keeps_common_formats_and_reencodes_others_losslessly():
    jpeg = photo_jpeg()
    assert prepare_for_storage(jpeg) == (jpeg, "jpg", 96, 96)
    bmp = bmp_image()
    stored, ext, width, height = prepare_for_storage(bmp)
    assert (ext, width, height) == ("png", 40, 30)
    assert stored[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(bmp)) as original:
        assert np.array_equal(np.asarray(decode_image(stored)), np.asarray(original.convert("RGB")))
