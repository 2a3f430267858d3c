"""Decoding the shards' JPEG members: libjpeg-turbo through simplejpeg, straight into a NumPy array.

The shard stage stores every image as an upright RGB JPEG (anything else is re-encoded), so the loaders
need one thing from a decoder: the RGB pixels of a JPEG, at full size or at 1/2, 1/4 or 1/8 by the
decoder's DCT scaling (``decode_reduction`` picks the smallest size an augmentation plan can use). simplejpeg
decodes into the array it returns, where PIL decodes into its own 4-bytes-per-pixel storage that
``np.asarray`` then repacks (``benchmarks/bench_loader.py`` measures the difference). Both wrap libjpeg-turbo
with the same defaults (accurate integer IDCT, smooth chroma upsampling), and the pixels are bit-identical to
PIL's, reduced sizes (PIL ``Image.draft``) included; ``tests/pipeline/shards/test_jpeg.py`` checks that.

Errors: anything that is not a whole, readable JPEG raises ``JpegError`` naming what the decoder said.
Decoding is strict, so libjpeg's "recoverable" warnings (a truncated stream, a corrupt entropy segment)
are errors too, never a silently half-grey image.
"""

from __future__ import annotations

import numpy as np
import simplejpeg

from ssd_core.augment import AugmentPlan, reduced_size

DECODE_REDUCTIONS = (8, 4, 2)  # the DCT scalings (1/8, 1/4, 1/2) libjpeg decodes at, largest first


class JpegError(ValueError):
    """The bytes are not a readable JPEG (message: the decoder's reason)."""


def jpeg_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from the JPEG header, without decoding any pixel."""
    try:
        height, width, _colorspace, _subsampling = simplejpeg.decode_jpeg_header(data)
    except ValueError as error:
        raise JpegError(f"unreadable JPEG header ({error})") from None
    return width, height


def decode_reduction(plan: AugmentPlan, size: int) -> int:
    """Largest ``r`` in 1, 2, 4, 8 with the plan's crop window at least ``r * size`` canvas pixels on both sides.

    Decoding the image at ``1 / r`` then still leaves at least one source pixel per output pixel, so
    ``ssd_core.augment.render_augmentation(..., reduction=r)`` loses no resolution the ``size x size`` output
    can show.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"decode_reduction: expected size as a positive int, got {size!r}")
    x0, y0, x1, y1 = plan.window
    side = min(x1 - x0, y1 - y0)
    return next((r for r in DECODE_REDUCTIONS if side >= r * size), 1)


def decode_rgb(data: bytes, *, width: int, height: int, reduction: int = 1) -> np.ndarray:
    """Decode a JPEG of the given size to RGB at ``1 / reduction`` -> uint8 ``[ceil(H/r), ceil(W/r), 3]``.

    ``width`` and ``height`` are the size the caller expects (the shard record's). The header is checked
    against them before a pixel is decoded, so a tampered or oversized member is refused without
    allocating its pixels.

    Raises:
        JpegError: unreadable bytes, a header size other than ``width`` x ``height``, or a decoding error.
        ValueError: ``reduction`` not in 1, 2, 4, 8.
    """
    if reduction not in (1, *DECODE_REDUCTIONS):
        raise ValueError(f"decode_rgb: expected reduction 1, 2, 4 or 8, got {reduction!r}")
    size = jpeg_size(data)
    if size != (width, height):
        raise JpegError(f"image is {size[0]}x{size[1]}, expected {width}x{height}")
    want_w, want_h = reduced_size(width, height, reduction)
    try:
        # min_factor asks for at least 1/r; min_width/min_height for no less than ceil(side / r): libjpeg's
        # scaling M/8 that satisfies both is exactly 1/r.
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_factor=reduction, min_width=want_w, min_height=want_h, strict=True
        )
    except ValueError as error:
        raise JpegError(f"corrupt JPEG ({error})") from None
    if pixels.shape != (want_h, want_w, 3):
        raise JpegError(
            f"decoder returned {pixels.shape[1]}x{pixels.shape[0]} pixels for {width}x{height} at "
            f"1/{reduction}, expected {want_w}x{want_h}"
        )
    return pixels
