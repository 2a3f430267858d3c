"""pipeline.shards.jpeg: the loaders' JPEG decoder gives PIL's pixels, at full and reduced size, refuses bad bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.shards.jpeg import JpegError, decode_reduction, decode_rgb, jpeg_size
from ssd_core.augment import AugmentOptions, plan_augmentation, reduced_size


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise and a few edges: chroma and DCT content like a photo's."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([x / width * 255, y / height * 255, (x + y) % 97 * 2.6], axis=-1)
    pixels += rng.normal(0, 12, pixels.shape)
    pixels[height // 3 : height // 2, width // 4 : width // 2] = (250, 20, 40)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def _pil_pixels(data: bytes, reduction: int) -> np.ndarray:
    """What the loaders decoded before: PIL, with ``Image.draft`` for DCT-scaled sizes."""
    with Image.open(io.BytesIO(data)) as image:
        w, h = image.size
        if reduction > 1:
            image.draft("RGB", (max(1, w // reduction), max(1, h // reduction)))
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize(("width", "height"), [(160, 120), (101, 67), (9, 250)])
def test_pixels_equal_pil_at_every_reduction(width, height, subsampling, progressive):
    data = _jpeg(_photo(width, height), subsampling=subsampling, progressive=progressive)
    assert jpeg_size(data) == (width, height)
    for reduction in (1, 2, 4, 8):
        ours = decode_rgb(data, width=width, height=height, reduction=reduction)
        expected = _pil_pixels(data, reduction)
        assert ours.shape == (-(-height // reduction), -(-width // reduction), 3)  # ceil, as libjpeg scales
        assert ours.dtype == np.uint8 and ours.flags.writeable
        np.testing.assert_array_equal(ours, expected)


def test_grayscale_jpeg_decodes_to_rgb_like_pil():
    data = _jpeg(_photo(64, 48).convert("L"))
    np.testing.assert_array_equal(decode_rgb(data, width=64, height=48), _pil_pixels(data, 1))


def test_a_size_other_than_expected_is_refused_before_decoding():
    data = _jpeg(_photo(64, 48))
    with pytest.raises(JpegError, match="image is 64x48, expected 640x480"):
        decode_rgb(data, width=640, height=480)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: b"", "unreadable JPEG header"),
        (lambda data: b"GIF89a" + data[6:], "unreadable JPEG header"),
        (lambda data: data[:200], "JPEG"),  # header intact, most of the scan missing
        (lambda data: data[:-400] + b"\xff\xd9", "corrupt JPEG"),  # the scan cut short, then a clean EOI
        (lambda data: data[:700] + bytes(range(256)) * 4 + data[700 + 1024 :], "corrupt JPEG"),
    ],
    ids=["empty", "not-a-jpeg", "cut-in-header-or-scan", "truncated-scan", "garbled-scan"],
)
def test_damaged_bytes_raise_jpeg_error(damage, message):
    data = _jpeg(_photo(96, 80))
    with pytest.raises(JpegError, match=message):
        decode_rgb(damage(data), width=96, height=80)


def test_reduction_must_be_a_dct_scaling():
    data = _jpeg(_photo(32, 32))
    with pytest.raises(ValueError, match="reduction 1, 2, 4 or 8"):
        decode_rgb(data, width=32, height=32, reduction=3)


def test_decode_reduction_rule():
    boxes, labels, difficult = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
    seen = set()
    for seed in range(200):
        plan = plan_augmentation(
            500, 400, boxes, labels, difficult, options=AugmentOptions(), generator=torch.Generator().manual_seed(seed)
        )
        r = decode_reduction(plan, 100)
        x0, y0, x1, y1 = plan.window
        side = min(x1 - x0, y1 - y0)
        assert side >= r * 100 and (r == 8 or side < 2 * r * 100)  # the largest power of two that fits, up to 8
        seen.add(r)
    assert seen == {1, 2, 4, 8}
    assert reduced_size(650, 417, 4) == (163, 105) and reduced_size(8, 8, 8) == (1, 1)
