"""Safe image reading: allowed formats only, bomb guard before decoding, truncation, EXIF orientation, RGB.

``open_checked`` is the one place a file is handed to Pillow (prepare, shard and predict all read through
it), and only the plugins of ``ALLOWED_FORMATS`` may parse it: Pillow knows ~40 formats, some with
decoders nobody here needs (EPS runs Ghostscript, TGA and SGI have little-used decoders), so anything else
is refused as ``image_format_not_allowed`` before their parsing code runs (to name the format, only their
16-byte signature checks look at a refused file).

Every failure is an ``ImageRejected`` carrying a short reason (the key counted in
``reports/prepare.json``) and a detail for the log; nothing here swallows an error silently.

Orientation: EXIF tag 274 says how the stored pixels must be turned to be displayed. Annotations are
taken to be in the stored-pixel frame (the frame the XML ``<size>`` describes), so ``orient_boxes``
moves boxes with the same transpose that ``load_rgb`` applies to the pixels.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

# The formats the README lists, as Pillow format names; no other plugin ever parses a file. MPO (a JPEG
# with extra pictures, as phones write them) has no opener of its own: the JPEG plugin opens it.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # PPM also reads PGM/PBM
_OPENERS = tuple(f for f in ALLOWED_FORMATS if f != "MPO")  # what Image.open(formats=...) is given
_SIGNATURE_BYTES = 16  # as much of the file as Pillow's signature checks look at

# Fill for transparent pixels: the ImageNet mean in 0..255, which normalisation maps to about zero.
TRANSPARENT_FILL_RGB = (124, 116, 104)

# Modes that ``to_rgb`` converts; anything else (e.g. "F" float images) is rejected.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
SUPPORTED_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"}) | _ALPHA_MODES | _WIDE_GREY_MODES

# EXIF orientation -> the PIL transpose that displays the stored pixels upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})


class ImageRejected(Exception):
    """An image that cannot be used; ``reason`` is the counted key, ``detail`` the log text."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What ``inspect_image`` learnt about a file. ``width``/``height`` are after EXIF orientation."""

    width: int
    height: int
    raw_width: int  # stored pixels, before orientation
    raw_height: int
    orientation: int  # EXIF orientation 1..8; 1: stored upright
    mode: str  # PIL mode of the stored pixels
    format: str  # PIL format name, e.g. "JPEG", "PNG"

    @property
    def needs_reencode(self) -> bool:
        """True unless the file is already an upright RGB JPEG whose bytes can be kept as they are."""
        return self.orientation != 1 or self.mode != "RGB" or self.format != "JPEG"


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Let PIL's own bomb check (which fires above 2x its limit, at open) use ``max_pixels``."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_checked(source: str | Path | bytes, *, max_pixels: int) -> Image.Image:
    """Open ``source`` (a path or encoded bytes) reading only the header; refuse other formats and bombs
    before decoding.

    Raises:
        ImageRejected: ``image_missing``, ``image_format_not_allowed`` (an image format outside
            ``ALLOWED_FORMATS``), ``image_unreadable`` (not an image / unreadable file) or ``image_too_large``
            (width * height > ``max_pixels``).
    """
    if isinstance(source, str | Path) and not Path(source).is_file():
        raise ImageRejected("image_missing", f"{source}: no such file")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with _pixel_limit(max_pixels):
            image = Image.open(stream, formats=_OPENERS)
    except Image.DecompressionBombError as error:
        raise ImageRejected("image_too_large", str(error)) from None
    except UnidentifiedImageError as error:
        claimed = _claimed_format(source)
        if claimed:
            raise ImageRejected(
                "image_format_not_allowed", f"{claimed}; allowed: {', '.join(ALLOWED_FORMATS)}"
            ) from None
        raise ImageRejected("image_unreadable", f"{type(error).__name__}: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        reason = "image_truncated" if "truncat" in str(error).lower() else "image_unreadable"
        raise ImageRejected(reason, f"{type(error).__name__}: {error}") from None
    if image.format not in ALLOWED_FORMATS:  # an allowed plugin handing back another format: refuse it too
        image.close()
        raise ImageRejected("image_format_not_allowed", f"{image.format}; allowed: {', '.join(ALLOWED_FORMATS)}")
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        image.close()
        raise ImageRejected(
            "image_too_large" if width * height > max_pixels else "image_unreadable",
            f"{width}x{height} pixels; limit {max_pixels} (prepare.max_image_pixels)",
        )
    return image


def _claimed_format(source: str | Path | bytes) -> str:
    """What a file no allowed plugin could open claims to be: "" for no image format at all (or a broken
    file of an allowed one), else a description such as ``"EPS (by its signature)"``.

    Only the signature checks of the other plugins run (each a comparison of the first 16 bytes; none of
    their parsing code). The extension names the format first where it is another plugin's: TGA, for one,
    has no signature of its own (its header can pass CUR's check).
    """
    try:
        if isinstance(source, bytes):
            prefix, suffix = source[:_SIGNATURE_BYTES], ""
        else:
            with open(source, "rb") as handle:
                prefix, suffix = handle.read(_SIGNATURE_BYTES), Path(source).suffix.lower()
    except OSError:
        return ""
    Image.init()
    matches = [name for name, (_, accept) in Image.OPEN.items() if accept is not None and _accepts(accept, prefix)]
    if any(name in ALLOWED_FORMATS for name in matches):
        return ""  # the signature of an allowed format with a header its plugin refused: unreadable
    by_extension = Image.registered_extensions().get(suffix)
    if by_extension and by_extension not in ALLOWED_FORMATS:
        return f"{by_extension} (by its extension {suffix})"
    return f"{matches[0]} (by its signature)" if matches else ""


def _accepts(accept: Any, prefix: bytes) -> bool:
    try:
        return bool(accept(prefix))
    except (IndexError, TypeError, ValueError, struct.error):  # a check written for longer prefixes
        return False


def decode(image: Image.Image) -> None:
    """Decode the pixels of a header-only ``image`` in place, mapping decoder failures to rejects."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        reason = "image_truncated" if "truncat" in str(error).lower() else "image_corrupt"
        raise ImageRejected(reason, f"{type(error).__name__}: {error}") from None


def exif_orientation(image: Image.Image) -> tuple[int, bool]:
    """EXIF orientation 1..8 of ``image`` (1 when absent) and whether the EXIF block was unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error):
        return 1, True
    return (value, False) if isinstance(value, int) and 1 <= value <= 8 else (1, True)


def oriented_size(raw_width: int, raw_height: int, orientation: int) -> tuple[int, int]:
    """(width, height) once ``orientation`` is applied."""
    return (raw_height, raw_width) if orientation in _SWAPS_AXES else (raw_width, raw_height)


def inspect_image(path: str | Path, *, max_pixels: int) -> ImageInfo:
    """Check that ``path`` is a whole, decodable image of a usable mode, no larger than ``max_pixels``.

    The size check happens on the header, before any pixel is decoded; then the whole image is
    decoded once so that truncated or corrupt files are caught here and not in a training worker.
    """
    image = open_checked(path, max_pixels=max_pixels)
    with image:
        if image.mode not in SUPPORTED_MODES:
            raise ImageRejected("image_unsupported_mode", f"mode {image.mode!r}; supported: {sorted(SUPPORTED_MODES)}")
        decode(image)  # before reading EXIF: PNG's getexif() decodes, and would swallow the decoder's error
        orientation, _ = exif_orientation(image)
        width, height = oriented_size(*image.size, orientation)
        return ImageInfo(width, height, image.size[0], image.size[1], orientation, image.mode, image.format or "")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any supported mode -> RGB. Transparent pixels are filled with ``TRANSPARENT_FILL_RGB``; 16/32-bit
    grey is scaled from 0..65535 to 0..255 (PIL's own conversion would clip it)."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY_MODES:
        grey = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)  # [H, W]
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*TRANSPARENT_FILL_RGB, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode not in SUPPORTED_MODES:
        raise ImageRejected("image_unsupported_mode", f"mode {image.mode!r}")
    return image.convert("RGB")


def orient(image: Image.Image, orientation: int) -> Image.Image:
    """Apply EXIF ``orientation`` to the pixels (as ``ImageOps.exif_transpose``, without touching metadata)."""
    return image.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else image


def load_rgb(source: str | Path | bytes, *, max_pixels: int) -> Image.Image:
    """Decode ``source`` into an upright RGB image (EXIF orientation applied), refusing bombs first."""
    image = open_checked(source, max_pixels=max_pixels)
    try:
        decode(image)  # first (see inspect_image); PIL releases a file it opened itself once pixels are loaded
        orientation, _ = exif_orientation(image)
    except ImageRejected:
        image.close()
        raise
    return to_rgb(orient(image, orientation))


def orient_boxes(boxes_px: np.ndarray, orientation: int, raw_width: float, raw_height: float) -> np.ndarray:
    """Move ``[N, 4]`` xyxy pixel boxes of the stored image into the frame ``orient`` produces.

    Each transpose maps a point (x, y) of the W x H stored image to (the new image is H x W for 5-8):
    2: (W-x, y)  3: (W-x, H-y)  4: (x, H-y)  5: (y, x)  6: (H-y, x)  7: (H-y, W-x)  8: (y, W-x)
    The box is the min/max of its mapped corners. Returns a new array; the input is not edited.
    """
    w, h = float(raw_width), float(raw_height)
    x1, y1, x2, y2 = (boxes_px[:, i].astype(np.float64) for i in range(4))
    corners = {
        1: (x1, y1, x2, y2),
        2: (w - x1, y1, w - x2, y2),
        3: (w - x1, h - y1, w - x2, h - y2),
        4: (x1, h - y1, x2, h - y2),
        5: (y1, x1, y2, x2),
        6: (h - y1, x1, h - y2, x2),
        7: (h - y1, w - x1, h - y2, w - x2),
        8: (y1, w - x1, y2, w - x2),
    }
    if orientation not in corners:
        raise ValueError(f"orient_boxes: orientation must be 1..8, got {orientation!r}")
    ax, ay, bx, by = corners[orientation]
    out = np.stack((np.minimum(ax, bx), np.minimum(ay, by), np.maximum(ax, bx), np.maximum(ay, by)), axis=1)
    return out.reshape(-1, 4)  # [N, 4]
