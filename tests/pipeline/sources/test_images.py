"""Safe image reading: EXIF orientation of pixels and boxes, conversion to RGB, bomb and truncation checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.sources.images import (
    ALLOWED_FORMATS,
    TRANSPARENT_FILL_RGB,
    ImageRejected,
    inspect_image,
    load_rgb,
    open_checked,
    orient,
    orient_boxes,
    oriented_size,
    to_rgb,
)
from tests.pipeline.fixtures import eps_bytes, image_with_box, png_header_only, save_jpeg


@st.composite
def _raw_box(draw):
    w, h = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    x1, y1 = draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1))
    x2, y2 = draw(st.integers(x1 + 1, w)), draw(st.integers(y1 + 1, h))
    return w, h, (x1, y1, x2, y2)


@settings(max_examples=60, deadline=None)
@given(_raw_box(), st.integers(1, 8))
def test_orient_boxes_follows_the_pixels(raw, orientation):
    """Reference: paint the box in a stored image, let PIL transpose it, measure where the paint went."""
    w, h, (x1, y1, x2, y2) = raw
    pixels = np.zeros((h, w), dtype=np.uint8)
    pixels[y1:y2, x1:x2] = 255
    upright = np.asarray(orient(Image.fromarray(pixels), orientation))
    ys, xs = np.nonzero(upright)
    painted = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # continuous coordinates of the painted pixels
    moved = orient_boxes(np.array([[x1, y1, x2, y2]], dtype=np.float64), orientation, w, h)
    assert moved.tolist() == [painted]
    assert upright.shape[::-1] == oriented_size(w, h, orientation)


def test_orient_boxes_rejects_bad_orientation_and_keeps_its_input():
    boxes = np.array([[1.0, 2.0, 3.0, 4.0]])
    orient_boxes(boxes, 6, 10, 10)
    assert boxes.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    with pytest.raises(ValueError, match="orientation must be 1..8"):
        orient_boxes(boxes, 9, 10, 10)


def test_exif_rotated_jpeg_is_loaded_upright(tmp_path):
    # Stored 40x20, red block at x 0..10 (left); orientation 8 turns it 90 degrees counter-clockwise for display,
    # so the display is 20x40 and the stored left edge becomes the bottom: red at y 30..40.
    path = save_jpeg(tmp_path / "r.jpg", image_with_box((40, 20), (0, 0, 10, 20)), orientation=8)
    info = inspect_image(path, max_pixels=10_000)
    assert (info.orientation, info.width, info.height, info.raw_width) == (8, 20, 40, 40)
    assert info.needs_reencode
    upright = np.asarray(load_rgb(path, max_pixels=10_000))
    assert upright.shape == (40, 20, 3)
    assert upright[35, 10, 0] > 150 and upright[5, 10, 0] < 100  # red at the bottom, blue at the top


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "I;16", "YCbCr"])
def test_to_rgb_converts_every_supported_mode(mode):
    source = (
        Image.fromarray(np.full((6, 8), 40000, dtype=np.uint16))
        if mode == "I;16"
        else (image_with_box((8, 6), (0, 0, 4, 6)).convert(mode))
    )
    rgb = to_rgb(source)
    assert rgb.mode == "RGB" and rgb.size == (8, 6)
    if mode == "I;16":
        assert np.asarray(rgb)[0, 0].tolist() == [156] * 3  # 40000 / 257 = 155.6 -> 156, not clipped to 255


def test_transparent_pixels_get_the_fill_colour():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == list(TRANSPARENT_FILL_RGB)


def test_bomb_is_refused_from_the_header_alone():
    # 20000 x 5000 = 1e8 pixels declared, 80 bytes of data: refused at open, before any pixel is decoded.
    data = png_header_only(20000, 5000)
    with pytest.raises(ImageRejected) as caught:
        open_checked(data, max_pixels=89_478_485)
    assert caught.value.reason == "image_too_large"
    # A limit of its own: 30 x 20 = 600 pixels > 500.
    small = io.BytesIO()
    Image.new("RGB", (30, 20)).save(small, format="PNG")
    with pytest.raises(ImageRejected, match="limit 500"):
        open_checked(small.getvalue(), max_pixels=500)
    assert open_checked(small.getvalue(), max_pixels=600).size == (30, 20)


def test_truncated_and_missing_files_are_named_reasons(tmp_path):
    path = save_jpeg(tmp_path / "t.jpg", image_with_box((64, 48), (1, 1, 30, 30)))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ImageRejected) as caught:
        inspect_image(path, max_pixels=10**6)
    assert caught.value.reason == "image_truncated"
    with pytest.raises(ImageRejected) as caught:
        inspect_image(tmp_path / "absent.jpg", max_pixels=10**6)
    assert caught.value.reason == "image_missing"


def _encoded(fmt: str, ext: str, tmp_path) -> tuple:
    """(path, bytes) of a 16x12 picture saved by Pillow as ``fmt`` (MPO: two frames)."""
    path = tmp_path / f"picture{ext}"
    picture = image_with_box((16, 12), (2, 2, 8, 8))
    extra = {"save_all": True, "append_images": [picture]} if fmt == "MPO" else {}
    picture.save(path, format=fmt, **extra)
    return path, path.read_bytes()


@pytest.mark.parametrize(
    ("fmt", "ext"),
    [
        ("JPEG", ".jpg"),
        ("MPO", ".mpo"),
        ("PNG", ".png"),
        ("BMP", ".bmp"),
        ("GIF", ".gif"),
        ("TIFF", ".tif"),
        ("WEBP", ".webp"),
        ("PPM", ".ppm"),
    ],
)
def test_every_allowed_format_opens_from_a_path_and_from_bytes(fmt, ext, tmp_path):
    assert fmt in ALLOWED_FORMATS
    for source in _encoded(fmt, ext, tmp_path):
        with open_checked(source, max_pixels=10_000) as image:
            assert (image.format, image.size) == (fmt, (16, 12))
        assert load_rgb(source, max_pixels=10_000).size == (16, 12)


@pytest.mark.parametrize(
    ("fmt", "ext"),
    [
        ("EPS", ".eps"),
        ("TGA", ".tga"),
        ("SGI", ".sgi"),
        ("ICO", ".ico"),
        ("PCX", ".pcx"),
        ("QOI", ".qoi"),
        ("DDS", ".dds"),
    ],
)
def test_other_formats_are_refused_before_their_plugin_parses_them(fmt, ext, tmp_path, monkeypatch):
    path, data = _encoded(fmt, ext, tmp_path)
    Image.init()
    factory, accept = Image.OPEN[fmt]
    parsed = []
    monkeypatch.setitem(Image.OPEN, fmt, (lambda *a: parsed.append(a) or factory(*a), accept))  # a spy
    with pytest.raises(ImageRejected) as caught:
        inspect_image(path, max_pixels=10_000)
    assert caught.value.reason == "image_format_not_allowed"
    assert fmt in caught.value.detail and "allowed: JPEG" in caught.value.detail
    if fmt != "TGA":  # TGA has no signature: only its extension names it; bytes are still refused
        with pytest.raises(ImageRejected, match="image_format_not_allowed"):
            load_rgb(data, max_pixels=10_000)
    else:
        with pytest.raises(ImageRejected):
            load_rgb(data, max_pixels=10_000)
    assert parsed == []  # the plugin of the refused format never saw the file


def test_an_eps_file_named_jpg_is_refused_by_its_signature(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(eps_bytes(16, 12))
    with pytest.raises(ImageRejected) as caught:
        inspect_image(path, max_pixels=10_000)
    assert (caught.value.reason, caught.value.detail.split(";")[0]) == (
        "image_format_not_allowed",
        "EPS (by its signature)",
    )


def test_text_and_empty_files_stay_unreadable(tmp_path):
    (tmp_path / "text.png").write_text("this is not a PNG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("text.png", "empty.jpg"):
        with pytest.raises(ImageRejected) as caught:
            inspect_image(tmp_path / name, max_pixels=10_000)
        assert caught.value.reason == "image_unreadable", name
