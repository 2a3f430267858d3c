"""SSD training augmentation and evaluation preprocessing on uint8 ``[3, H, W]`` RGB tensors.

``train_transform`` runs the original SSD chain (Caffe SSD / ssd.pytorch ``SSDAugmentation``):

1. photometric distortion (:mod:`ssd_core.photometric`);
2. expansion ("zoom out", probability 1/2): the image is placed at a random integer offset on a canvas
   ``ratio`` times its size, ``ratio ~ U(1, expand_max_ratio)``, filled with the dataset mean colour;
3. min-IoU random crop: one of seven options with equal probability: the whole image, a crop whose IoU
   with at least one box is >= 0.1 / 0.3 / 0.5 / 0.7 / 0.9 (Caffe's ``SatisfySampleConstraint``), or any
   crop; up to 50 trials of side 0.3..1 times the canvas side and aspect ratio h/w in [0.5, 2]; a trial
   must keep at least one box, a box is kept when its centre lies strictly inside the crop, then it is
   clipped to the crop;
4. resize to ``size x size`` (bilinear, ``align_corners=False``, no antialiasing, like the original
   ``cv2.resize``), rounded back to uint8;
5. horizontal flip with probability 1/2.

Edge cases, decided here: when no trial of the chosen crop option succeeds in 50 tries, the image stays
uncropped (the original drew another option, looping forever on some images). An image without boxes
has no IoU or centre constraint: it gets a random crop of the allowed shape (or none) and returns an
empty box set. Boxes that end up degenerate (zero width or height after clipping and float rounding)
are dropped with their labels and difficult flags, so every output box is finite with positive area.

How it is computed (the literal chain's result up to float rounding, at most 1 grey level in rare pixels;
much less work). The chain is split in two: :func:`plan_augmentation` draws every random number and does
all the box geometry from the image size alone; :func:`render_augmentation` then makes the pixels.
:func:`plan_augmentations` plans a whole batch in one vectorised pass, with exactly the same plans (for a
loader that makes batches: NumPy's per-call overhead, not arithmetic, is most of planning one image).
Rendering never builds the zoomed-out canvas (up to 16 times the image) and touches only the source
pixels the output reads:

- the photometric steps act on one pixel at a time, so they are applied only to the part of the image
  inside the crop window: exactly the values the full-image order gives there (the order of the steps is
  unchanged, the resize still comes after them);
- the resize is separable: each output row (column) is the weighted sum of two source rows (columns), with
  the bilinear weights of ``interpolate(align_corners=False)`` on the canvas window; a tap that falls on
  the canvas instead of the image contributes the fill colour with its weight. Rows first (one
  ``embedding_bag``: gather and weighted sum in one pass), then columns. The flip mirrors the uint8 result.

Reduced-resolution sources (for decoders that can decode a JPEG at 1/2, 1/4 or 1/8 scale, see
:func:`decode_reduction`): ``render_augmentation(..., reduction=r)`` takes the image decoded at ``1/r`` of
its size (``ceil(W / r) x ceil(H / r)``; reduced pixel ``j`` covers full pixels ``[j r, (j + 1) r)``, so its
centre is at ``(j + 0.5) r - 0.5``) and samples it at the same canvas positions, with the same fill share
at the image's border. It is used only when the window is at least ``r * size`` pixels on both sides, so
each output pixel still spans at least one reduced pixel. The result is close to, not equal to, the
full-resolution one: the decoder's scaling averages each r x r block where the plain bilinear resize
reads 2 x 2 pixels and skips the rest, so fine texture aliases less (measured on the raccoon photos at
300 x 300: 0.75 grey levels mean absolute difference; tests bound it and check the reduced result is no
farther than the full one from an antialiased resize). The geometry and the boxes are identical.

Randomness comes only from the ``torch.Generator`` argument, in this order: photometric (11 numbers),
expansion (4), crop (1 + 4 x 50), flip (1); a disabled step draws nothing. One seed gives one result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssd_core.photometric import (
    PHOTOMETRIC_DRAWS,
    PhotometricParams,
    apply_photometric,
    photometric_from_uniforms,
    sample_photometric,
)

IMAGE_MEAN = (0.485, 0.456, 0.406)  # RGB on the 0..1 scale (ImageNet), what VGG16 weights expect
IMAGE_STD = (0.229, 0.224, 0.225)
FILL_COLOUR = tuple(255.0 * m for m in IMAGE_MEAN)  # expansion canvas, on the 0..255 scale

# Crop options, drawn with equal probability. None: keep the whole image; a number: the crop must have
# IoU >= it with at least one box; -inf: any crop ("no constraint" in the paper).
CROP_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -math.inf)
CROP_TRIALS = 50  # random crops tried per image before giving up (original)
CROP_MIN_SCALE = 0.3  # smallest crop side / canvas side (original)
CROP_ASPECT_RANGE = (0.5, 2.0)  # allowed crop height / width in pixels (original)
DECODE_REDUCTIONS = (8, 4, 2)  # JPEG DCT scalings (1/8, 1/4, 1/2) that decode_reduction may choose


@dataclass(frozen=True)
class AugmentOptions:
    """Which augmentation steps :func:`train_transform` applies.

    Attributes:
        photometric: brightness, contrast, saturation, hue in the original's random order.
        expand: zoom out onto a mean-coloured canvas with probability 1/2.
        expand_max_ratio: largest canvas side / image side (original: 4).
        crop: min-IoU random crop.
        flip: horizontal flip with probability 1/2.
        channel_swap: the original's random channel permutation (off: it changes colour identity).
    """

    photometric: bool = True
    expand: bool = True
    expand_max_ratio: float = 4.0
    crop: bool = True
    flip: bool = True
    channel_swap: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.expand_max_ratio) and self.expand_max_ratio >= 1.0):
            got = self.expand_max_ratio
            raise ValueError(f"AugmentOptions.expand_max_ratio: expected a finite number >= 1, got {got}")


class Sample(NamedTuple):
    """One augmented training sample.

    Attributes:
        image: uint8 ``[3, S, S]``.
        boxes: float32 ``[G', 4]`` xyxy normalised, inside [0, 1] with positive area.
        labels: int64 ``[G']``, aligned with ``boxes``.
        difficult: bool ``[G']``, aligned with ``boxes``.
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    difficult: Tensor


class Expansion(NamedTuple):
    """Where the image sits on the zoom-out canvas (pixels); no expansion is ``(W, H, 0, 0)``."""

    canvas_width: int
    canvas_height: int
    left: int
    top: int


class CropChoice(NamedTuple):
    """Outcome of :func:`sample_crop`.

    Attributes:
        window: ``(x0, y0, x1, y1)`` integer pixels of the canvas, or None for the whole canvas.
        keep: bool ``[G]``, the boxes whose centre is strictly inside the window (all when None).
        min_iou: the option drawn: None (whole image), a number, or -inf (any crop).
    """

    window: tuple[int, int, int, int] | None
    keep: Tensor
    min_iou: float | None


class AugmentPlan(NamedTuple):
    """Everything :func:`train_transform` draws and computes before touching a pixel.

    Attributes:
        width, height: the source image size in pixels.
        photometric: the drawn photometric steps, or None when photometric distortion is off.
        expansion: where the image sits on the canvas.
        window: ``(x0, y0, x1, y1)`` canvas pixels that become the output (the whole canvas when not cropped).
        flip: mirror the output horizontally.
        boxes: float32 ``[G', 4]`` output boxes, xyxy normalised to the output, positive area.
        labels: int64 ``[G']``.
        difficult: bool ``[G']``.
    """

    width: int
    height: int
    photometric: PhotometricParams | None
    expansion: Expansion
    window: tuple[int, int, int, int]
    flip: bool
    boxes: Tensor
    labels: Tensor
    difficult: Tensor


def _check_generator(name: str, generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        got = type(generator).__name__
        raise TypeError(f"{name}: expected a torch.Generator (the only source of randomness), got {got}")
    if generator.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU torch.Generator, got one on {generator.device}")


def sample_expansion(width: int, height: int, max_ratio: float, generator: torch.Generator) -> Expansion:
    """Zoom out with probability 1/2 to a canvas ``int(side * ratio)``, ``ratio ~ U(1, max_ratio)``.

    Draws 4 numbers. The image's top-left corner is uniform over the integer positions that keep it
    inside the canvas.
    """
    coin, r, ux, uy = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    if coin >= 0.5 or max_ratio <= 1.0:
        return Expansion(width, height, 0, 0)
    ratio = 1.0 + (max_ratio - 1.0) * r
    canvas_w, canvas_h = int(width * ratio), int(height * ratio)
    left = min(int(ux * (canvas_w - width + 1)), canvas_w - width)
    top = min(int(uy * (canvas_h - height + 1)), canvas_h - height)
    return Expansion(canvas_w, canvas_h, left, top)


def _box_iou_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``ssd_core.boxes.box_iou`` for float64 ``[..., N, 4]`` and ``[..., M, 4]`` NumPy arrays -> ``[..., N, M]``
    (leading dimensions broadcast: a batch of box sets at once), the same operations in the same order (so
    the same values); NumPy is ~10x cheaper than torch at these sizes."""
    ax0, ay0, ax1, ay1 = (a[..., :, None, k] for k in range(4))  # [..., N, 1] each
    bx0, by0, bx1, by1 = (b[..., None, :, k] for k in range(4))  # [..., 1, M] each
    inter = np.maximum(np.minimum(ax1, bx1) - np.maximum(ax0, bx0), 0.0)
    inter *= np.maximum(np.minimum(ay1, by1) - np.maximum(ay0, by0), 0.0)  # [..., N, M]
    area_a = np.maximum(ax1 - ax0, 0.0) * np.maximum(ay1 - ay0, 0.0)
    area_b = np.maximum(bx1 - bx0, 0.0) * np.maximum(by1 - by0, 0.0)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.maximum(union, np.finfo(np.float64).tiny), 0.0)


def _sample_crop_np(boxes_px: np.ndarray, width: int, height: int, generator: torch.Generator,
                    max_trials: int) -> tuple[tuple[int, int, int, int] | None, np.ndarray, float | None]:
    """:func:`sample_crop` on a float64 ``[G, 4]`` array: (window, keep ``[G]`` bool array, min_iou)."""
    g = boxes_px.shape[0]
    draws = torch.rand(1 + 4 * max_trials, generator=generator, dtype=torch.float64).numpy()
    min_iou = CROP_MIN_IOUS[min(int(draws[0] * len(CROP_MIN_IOUS)), len(CROP_MIN_IOUS) - 1)]
    keep_all = np.ones(g, dtype=bool)
    if min_iou is None:
        return None, keep_all, None
    u = draws[1:].reshape(max_trials, 4)
    w = width * (CROP_MIN_SCALE + (1.0 - CROP_MIN_SCALE) * u[:, 0])  # [T]
    h = height * (CROP_MIN_SCALE + (1.0 - CROP_MIN_SCALE) * u[:, 1])  # [T]
    left, top = u[:, 2] * (width - w), u[:, 3] * (height - h)  # [T]
    rects = np.floor(np.stack((left, top, left + w, top + h), axis=-1))  # [T, 4] integer pixels
    aspect = h / w
    ok = (aspect >= CROP_ASPECT_RANGE[0]) & (aspect <= CROP_ASPECT_RANGE[1])
    ok &= (rects[:, 2] > rects[:, 0]) & (rects[:, 3] > rects[:, 1])
    inside = np.zeros((max_trials, g), dtype=bool)
    if g > 0:
        ok &= _box_iou_np(rects, boxes_px).max(axis=1) >= min_iou
        centres = (boxes_px[:, :2] + boxes_px[:, 2:]) / 2  # [G, 2]
        inside = ((rects[:, None, :2] < centres) & (centres < rects[:, None, 2:])).all(axis=-1)  # [T, G]
        ok &= inside.any(axis=1)
    hits = np.flatnonzero(ok)
    if hits.size == 0:
        return None, keep_all, min_iou
    t = int(hits[0])
    x0, y0, x1, y1 = (int(v) for v in rects[t])
    return (x0, y0, x1, y1), inside[t], min_iou


def sample_crop(
    boxes_px: Tensor, width: int, height: int, generator: torch.Generator, *, max_trials: int = CROP_TRIALS
) -> CropChoice:
    """Draw a crop option and up to ``max_trials`` crops at once; take the first that satisfies it.

    Args:
        boxes_px: ``[G, 4]`` xyxy boxes in pixels of the ``width x height`` canvas.
        width, height: canvas size in pixels.
        generator: draws ``1 + 4 * max_trials`` numbers.
        max_trials: crops tried (original: 50).

    Returns:
        :class:`CropChoice`; ``window`` is None for the whole-image option and when no trial succeeds.
    """
    boxes = boxes_px.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1, 4)
    window, keep, min_iou = _sample_crop_np(boxes, width, height, generator, max_trials)
    return CropChoice(window, torch.from_numpy(keep), min_iou)


def canvas_window(image: Tensor, expansion: Expansion, window: tuple[int, int, int, int] | None = None) -> Tensor:
    """Pixels ``window`` of the expansion canvas (the whole canvas when None), as float32.

    The slow, literal form of what :func:`train_transform` samples (it never builds the canvas).

    Args:
        image: ``[3, H, W]`` image placed at ``(expansion.left, expansion.top)``.
        expansion: the canvas; outside the image it has :data:`FILL_COLOUR`.
        window: ``(x0, y0, x1, y1)`` inside the canvas.

    Returns:
        float32 ``[3, y1 - y0, x1 - x0]``.
    """
    height, width = image.shape[1:]
    x0, y0, x1, y1 = window if window is not None else (0, 0, expansion.canvas_width, expansion.canvas_height)
    left, top = expansion.left, expansion.top
    fill = torch.tensor(FILL_COLOUR, dtype=torch.float32, device=image.device)
    region = fill.view(3, 1, 1).expand(3, y1 - y0, x1 - x0).clone()  # [3, h, w]
    ix0, iy0 = max(x0, left), max(y0, top)  # the image's part of the window
    ix1, iy1 = min(x1, left + width), min(y1, top + height)
    if ix1 > ix0 and iy1 > iy0:
        region[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = image[:, iy0 - top : iy1 - top, ix0 - left : ix1 - left]
    return region


def _resize(image: Tensor, size: int) -> Tensor:
    """float or uint8 ``[3, h, w]`` -> uint8 ``[3, size, size]`` with ``interpolate`` (bilinear, no antialias).

    The literal resize, kept as the reference the separable one (:func:`_resize_window`) is checked against.
    """
    x = image if image.is_floating_point() else image.float()
    if tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False)[0]
    return x.round().clamp_(0.0, 255.0).to(torch.uint8)


# ------------------------------------------------------------------------------------ resampling
class _Taps(NamedTuple):
    """The two source pixels each output pixel reads along one axis, and their weights.

    ``first``/``second``: int64 ``[S]`` indices into the source axis; ``w_first``/``w_second``: float64 ``[S]``
    bilinear weights already multiplied by ``coverage``, the image's share of the sample (1 inside the
    image, 0 on the fill, in between on the one-pixel border). ``lo``/``hi``: the source range read with a
    positive weight (``hi`` exclusive); ``lo == hi`` when every sample falls on the fill.
    """

    first: np.ndarray
    second: np.ndarray
    w_first: np.ndarray
    w_second: np.ndarray
    coverage: np.ndarray
    lo: int
    hi: int


def _axis_taps(start: int, length: int, size: int, offset: int, image_len: int, reduction: int = 1,
               source_len: int | None = None) -> _Taps:
    """Bilinear taps of ``size`` outputs over the canvas span ``[start, start + length)`` along one axis.

    Output ``i`` reads canvas position ``p = clamp((i + 0.5) * length / size - 0.5, 0, length - 1) + start``
    (what ``interpolate(bilinear, align_corners=False)`` reads on the window). The image covers canvas
    pixels ``[offset, offset + image_len)``; ``u = p - offset`` is the full-resolution image coordinate. On
    the canvas the sample is ``c image(u) + (1 - c) fill`` with coverage ``c = clamp(min(u + 1, image_len - u),
    0, 1)``: the same two-pixel blend as reading the literal canvas (an image pixel next to a fill pixel).
    ``image(u)`` is read from a source decoded at ``1 / reduction`` (``source_len`` pixels) at ``q = (u + 0.5) /
    reduction - 0.5``, clamped to the source.
    """
    n = image_len if source_len is None else source_len
    p = (np.arange(size, dtype=np.float64) + 0.5) * (length / size) - 0.5
    u = np.minimum(np.maximum(p, 0.0), length - 1.0) + (start - offset)  # [S] full-resolution image coordinates
    coverage = np.minimum(np.maximum(np.minimum(u + 1.0, image_len - u), 0.0), 1.0)  # [S]
    q = u if reduction == 1 else (u + 0.5) / reduction - 0.5
    q = np.minimum(np.maximum(q, 0.0), max(n - 1.0, 0.0))
    first = q.astype(np.int64)  # floor: q >= 0
    lam = q - first
    second = np.minimum(first + 1, max(n - 1, 0))
    touching = np.flatnonzero(coverage > 0)  # outputs that read the image; q rises with the output index
    if touching.size == 0:
        return _Taps(first * 0, second * 0, lam * 0, lam * 0, coverage, 0, 0)
    lo, hi = int(first[touching[0]]), int(first[touching[-1]]) + 1
    if lam[touching].any():
        hi = max(hi, int(second[touching][lam[touching] > 0].max()) + 1)
    first, second = np.minimum(np.maximum(first, lo), hi - 1), np.minimum(np.maximum(second, lo), hi - 1)
    return _Taps(first, second, (1.0 - lam) * coverage, lam * coverage, coverage, lo, hi)


def _weighted_rows(table: Tensor, taps: _Taps, blocks: int, extra: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> Tensor:
    """Per block of ``table [blocks * n (+ extra rows), d]``, the ``S`` rows ``w_first * row[first] + w_second *
    row[second]`` -> ``[blocks * S, d]`` with one ``embedding_bag`` (gather and weighted sum in one pass).

    ``extra = (rows [blocks, k], weights [S, k])`` adds ``k`` more taps per output row: rows of ``table``
    beyond the blocks (e.g. constant fill rows), each block its own.
    """
    n = (table.shape[0] if extra is None else table.shape[0] - extra[0].size) // blocks
    bags = np.stack((taps.first, taps.second), axis=1)[None] + (np.arange(blocks) * n)[:, None, None]  # [blocks, S, 2]
    weights = np.stack((taps.w_first, taps.w_second), axis=1)  # [S, 2]
    if extra is not None:
        rows, extra_weights = extra
        bags = np.concatenate((bags, np.broadcast_to(rows[:, None, :], (blocks, *extra_weights.shape))), axis=2)
        weights = np.concatenate((weights, extra_weights), axis=1)  # [S, 2 + k]
    weights = np.broadcast_to(weights.astype(np.float32), bags.shape).reshape(-1, bags.shape[2])
    return F.embedding_bag(torch.from_numpy(bags.reshape(-1, bags.shape[2])), table,
                           per_sample_weights=torch.from_numpy(weights), mode="sum")


def _to_uint8(x: Tensor) -> Tensor:
    """float32 ``[3, S, S]`` (any strides) -> uint8, rounded to the nearest integer and clamped to [0, 255]."""
    x = x.round_().clamp_(0.0, 255.0)
    # NumPy's cast is several times faster than torch's here; a strided result is cast first, then made
    # contiguous as uint8 (a quarter of the bytes to move).
    return torch.from_numpy(np.ascontiguousarray(x.numpy().astype(np.uint8)))


def _resample(image: Tensor, rows: _Taps, cols: _Taps, size: int, *, interpolate_cols: bool = False) -> Tensor:
    """uint8 ``[3, S, S]`` from the source pixels ``image`` (``[3, h, w]``, uint8 or float, any layout).

    ``rows``/``cols`` index ``image``. Rows first: each output row is the weighted sum of two source rows
    (``[3, S, w]``); then columns the same way, on the transposed rows. The fill colour's share of a pixel,
    ``1 - c_row c_col``, enters as extra constant rows of the column pass. With ``interpolate_cols`` the
    columns of ``image`` must be exactly the window's, all inside the image: the column pass is then
    ``interpolate(linear)``, which reads the same taps with the same weights and needs no transpose.
    """
    s = size
    x = image
    if image.dtype != torch.float32 or not image.is_contiguous():
        x = torch.empty(image.shape, dtype=torch.float32).copy_(image)  # conversion and layout in one pass
    _, h, w = x.shape
    blended = _weighted_rows(x.view(3 * h, w), rows, 3).view(3, s, w)  # [3, S, w]
    fill = torch.tensor(FILL_COLOUR, dtype=torch.float32)
    row_gap = (1.0 - rows.coverage).astype(np.float32)  # [S] fill share from the rows alone
    if interpolate_cols:  # every column inside the image: the fill share is 1 - c_row
        out = F.interpolate(blended, size=s, mode="linear", align_corners=False)  # [3, S, S]
        if row_gap.any():
            out.addcmul_(fill.view(3, 1, 1), torch.from_numpy(row_gap).view(1, s, 1))
        return _to_uint8(out)
    by_column = torch.empty(3 * w + 6, s)  # [3 w + 6, S]: columns as rows, then two fill rows per channel
    by_column[: 3 * w].view(3, w, s).copy_(blended.transpose(1, 2))
    by_column[3 * w : 3 * w + 3] = fill.view(3, 1) * torch.from_numpy(row_gap).view(1, s)  # fill (1 - c_row)
    by_column[3 * w + 3 :] = fill.view(3, 1)  # fill
    fill_rows = 3 * w + np.array([[0, 3], [1, 4], [2, 5]])  # [3, 2] per channel
    # fill share 1 - c_row c_col = c_col (1 - c_row) + (1 - c_col): two extra taps per output column
    fill_weights = np.stack((cols.coverage, 1.0 - cols.coverage), axis=1)  # [S, 2]
    out = _weighted_rows(by_column, cols, 3, (fill_rows, fill_weights)).view(3, s, s)  # [3, S(x), S(y)]
    return _to_uint8(out.transpose(1, 2))


def _fill_image(size: int) -> Tensor:
    fill = torch.tensor(FILL_COLOUR, dtype=torch.float32).round().to(torch.uint8)
    return fill.view(3, 1, 1).expand(3, size, size).contiguous()


def _shifted(taps: _Taps) -> _Taps:
    """``taps`` relative to a source cropped to ``[lo, hi)``."""
    return taps._replace(first=taps.first - taps.lo, second=taps.second - taps.lo, lo=0, hi=taps.hi - taps.lo)


def _resize_window(image: Tensor, expansion: Expansion, window: tuple[int, int, int, int], size: int) -> Tensor:
    """``_resize(canvas_window(image, expansion, window), size)`` without building the window.

    Separable bilinear sampling at the same points (see :func:`_axis_taps`), reading only the image rows
    and columns that some output pixel reads; the cost is ``O(S (S + w))`` for a read span ``w``, never the
    area of a canvas up to 16 times the image. A float32 contiguous ``image`` is read in place.
    """
    height, width = image.shape[1:]
    x0, y0, x1, y1 = window
    left, top = expansion.left, expansion.top
    rows = _axis_taps(y0, y1 - y0, size, top, height)
    cols = _axis_taps(x0, x1 - x0, size, left, width)
    if rows.lo == rows.hi or cols.lo == cols.hi:
        return _fill_image(size)
    aligned = x0 >= left and x1 <= left + width  # all columns inside the image: the interpolate column pass
    if aligned:
        cols = cols._replace(lo=x0 - left, hi=x1 - left)  # exactly the window's columns
    in_place = image.dtype == torch.float32 and image.is_contiguous()
    if in_place and (not aligned or (cols.lo, cols.hi) == (0, width)):
        return _resample(image, rows, cols, size, interpolate_cols=aligned)
    source = image[:, rows.lo : rows.hi, cols.lo : cols.hi]  # converted to float once, only this part
    return _resample(source, _shifted(rows), _shifted(cols), size, interpolate_cols=aligned)


def _check_image(name: str, image: Tensor) -> None:
    if not isinstance(image, Tensor) or image.dtype != torch.uint8:
        got = image.dtype if isinstance(image, Tensor) else type(image).__name__
        raise TypeError(f"{name}: expected a uint8 image tensor, got {got}")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{name}: expected image [3, H, W] (RGB) with H, W >= 1, got {list(image.shape)}")


def _check_size(name: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name}: expected size as a positive int, got {size!r}")


def eval_transform(image: Tensor, size: int) -> Tensor:
    """Resize only: uint8 ``[3, H, W]`` -> uint8 ``[3, size, size]`` (the same resize as training)."""
    _check_image("eval_transform", image)
    _check_size("eval_transform", size)
    height, width = image.shape[1:]
    return _resize_window(image, Expansion(width, height, 0, 0), (0, 0, width, height), size)


# ---------------------------------------------------------------------------------- augmentation
def _check_plan_input(name: str, width: int, height: int, boxes: Tensor, labels: Tensor, difficult: Tensor) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (width, height)):
        raise ValueError(f"{name}: expected the image size as two positive ints, got {width!r} x {height!r}")
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
        got = f"{boxes.dtype} {list(boxes.shape)}" if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{name}: expected float boxes [G, 4] (xyxy normalised), got {got}")
    g = boxes.shape[0]
    if labels.shape != (g,) or difficult.shape != (g,):
        raise ValueError(
            f"{name}: expected labels [G] and difficult [G] with G = {g} (one per box), "
            f"got {list(labels.shape)} and {list(difficult.shape)}"
        )


def plan_augmentation(
    width: int,
    height: int,
    boxes: Tensor,
    labels: Tensor,
    difficult: Tensor,
    *,
    options: AugmentOptions,
    generator: torch.Generator,
) -> AugmentPlan:
    """Draw every random choice of :func:`train_transform` and compute the output boxes, without pixels.

    Args:
        width, height: source image size in pixels (>= 1).
        boxes: float ``[G, 4]`` xyxy normalised to [0, 1].
        labels: int64 ``[G]`` class indices.
        difficult: bool ``[G]`` VOC difficult flags.
        options: which steps to apply.
        generator: the only source of randomness (CPU); draws in the order of the module docstring.

    Returns:
        :class:`AugmentPlan`; :func:`render_augmentation` makes its image.
    """
    name = "plan_augmentation"
    if not isinstance(options, AugmentOptions):
        raise TypeError(f"{name}: expected options as an AugmentOptions, got {type(options).__name__}")
    _check_generator(name, generator)
    _check_plan_input(name, width, height, boxes, labels, difficult)
    g = boxes.shape[0]
    photometric = sample_photometric(generator, channel_swap=options.channel_swap) if options.photometric else None
    expansion = Expansion(width, height, 0, 0)
    if options.expand:
        expansion = sample_expansion(width, height, options.expand_max_ratio, generator)
    scale = np.array([width, height, width, height], dtype=np.float64)
    offset = np.array([expansion.left, expansion.top] * 2, dtype=np.float64)
    boxes_px = boxes.detach().cpu().to(torch.float64).numpy() * scale + offset  # [G, 4] canvas pixels
    keep = np.ones(g, dtype=bool)
    window = (0, 0, expansion.canvas_width, expansion.canvas_height)
    if options.crop:
        crop, inside, _ = _sample_crop_np(boxes_px, expansion.canvas_width, expansion.canvas_height, generator,
                                          CROP_TRIALS)
        if crop is not None:
            window, keep = crop, inside
            boxes_px = boxes_px[keep]

    x0, y0, x1, y1 = window
    lower, upper = np.array([x0, y0] * 2, dtype=np.float64), np.array([x1, y1] * 2, dtype=np.float64)
    extent = np.array([x1 - x0, y1 - y0] * 2, dtype=np.float64)
    out = ((np.minimum(np.maximum(boxes_px, lower), upper) - lower) / extent).astype(np.float32)  # [G', 4]
    flip = options.flip and float(torch.rand((), generator=generator, dtype=torch.float64)) < 0.5
    if flip:
        out = np.stack((1 - out[:, 2], out[:, 1], 1 - out[:, 0], out[:, 3]), axis=-1)
    out = np.minimum(np.maximum(out, 0.0), 1.0)
    good = np.isfinite(out).all(axis=1) & (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])  # positive area
    select = torch.from_numpy(np.flatnonzero(keep)[good])
    return AugmentPlan(
        width, height, photometric, expansion, window, flip, torch.from_numpy(np.ascontiguousarray(out[good])),
        labels.to(torch.int64)[select], difficult.to(torch.bool)[select],
    )


# ------------------------------------------------------------------------- planning a batch at once
def _expansions(canvas: np.ndarray, max_ratio: float, draws: np.ndarray) -> np.ndarray:
    """:func:`sample_expansion` for ``B`` images at once: int64 ``[B, 4]`` rows ``(width, height, 0, 0)`` and
    float64 ``[B, 4]`` draws -> int64 ``[B, 4]`` rows ``(canvas_width, canvas_height, left, top)``."""
    size = canvas[:, :2]  # [B, 2]
    expanded = canvas.copy()
    expanded[:, :2] = size * (1.0 + (max_ratio - 1.0) * draws[:, 1:2])  # int(side * ratio): truncated
    slack = expanded[:, :2] - size  # [B, 2] positions for the image's corner: 0..slack
    expanded[:, 2:] = np.minimum(draws[:, 2:] * (slack + 1), slack)  # truncated, then at most slack
    return np.where((draws[:, :1] < 0.5) & (max_ratio > 1.0), expanded, canvas)


def _crops(boxes_px: np.ndarray, valid: np.ndarray, width: np.ndarray, height: np.ndarray,
           draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_crop` for ``B`` canvases at once, all trials of all canvases in one pass.

    Args:
        boxes_px: float64 ``[B, G, 4]`` xyxy canvas pixels; rows beyond a canvas's own boxes are padding.
        valid: bool ``[B, G]``, False on the padding.
        width, height: int64 ``[B]`` canvas sizes.
        draws: float64 ``[B, 1 + 4 T]``: the option, then 4 numbers per trial.

    Returns:
        (window int64 ``[B, 4]``: the whole canvas where the option is the whole image or no trial succeeded,
        keep bool ``[B, G]``: the boxes whose centre lies strictly inside the window).
    """
    b, trials = len(width), (draws.shape[1] - 1) // 4
    option = np.minimum((draws[:, 0] * len(CROP_MIN_IOUS)).astype(np.int64), len(CROP_MIN_IOUS) - 1)  # [B]
    min_iou = np.array([np.nan if v is None else v for v in CROP_MIN_IOUS])[option]  # NaN: whole image
    u = draws[:, 1:].reshape(b, trials, 4)
    canvas = np.stack((width, height), axis=1)[:, None].astype(np.float64)  # [B, 1, 2]
    wh = canvas * (CROP_MIN_SCALE + (1.0 - CROP_MIN_SCALE) * u[..., :2])  # [B, T, 2] crop width, height
    corner = u[..., 2:] * (canvas - wh)  # [B, T, 2] left, top
    rects = np.floor(np.concatenate((corner, corner + wh), axis=2))  # [B, T, 4] integer pixels
    aspect = wh[..., 1] / wh[..., 0]
    ok = (aspect >= CROP_ASPECT_RANGE[0]) & (aspect <= CROP_ASPECT_RANGE[1]) & ~np.isnan(min_iou)[:, None]
    ok &= (rects[..., 2:] > rects[..., :2]).all(axis=2)
    # Without boxes there is no IoU or centre constraint; with boxes, the best IoU must reach the option's
    # minimum (a NaN IoU, from a non-finite box, fails it) and some box centre must lie strictly inside.
    with np.errstate(divide="ignore", invalid="ignore"):  # NaN padding (never inside), non-finite boxes (fail)
        iou = np.where(valid[:, None], _box_iou_np(rects, boxes_px), -np.inf)  # [B, T, G]
        best_iou = iou.max(axis=2, initial=-np.inf)  # [B, T]
        centres = (boxes_px[:, None, :, :2] + boxes_px[:, None, :, 2:]) / 2  # [B, 1, G, 2]
        inside = ((rects[:, :, None, :2] < centres) & (centres < rects[:, :, None, 2:])).all(axis=3)  # [B, T, G]
        ok &= ~valid.any(axis=1)[:, None] | ((best_iou >= min_iou[:, None]) & inside.any(axis=2))
    cropped, first = ok.any(axis=1), ok.argmax(axis=1)  # [B]: the first trial that satisfies the option
    window = np.zeros((b, 4), dtype=np.int64)  # the whole canvas where no trial succeeded
    window[:, 2], window[:, 3] = width, height
    window[cropped] = rects[cropped, first[cropped]]
    keep = valid.copy()
    keep[cropped] = inside[cropped, first[cropped]]
    return window, keep


def plan_augmentations(
    sizes: Sequence[tuple[int, int]],
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    difficult: Sequence[Tensor],
    *,
    options: AugmentOptions,
    generators: Sequence[torch.Generator],
) -> list[AugmentPlan]:
    """:func:`plan_augmentation` for a batch of images: exactly the same plans, computed together.

    Each image draws from its own generator exactly what :func:`plan_augmentation` draws, in one call (the
    same stream), so a plan does not depend on the rest of the batch. The geometry of all images (expansion,
    every crop trial, the output boxes) is then computed in one vectorised pass, boxes padded to the batch's
    largest count with NaN rows that no step keeps. Every value comes from the same floating-point operations
    as in :func:`plan_augmentation`, so the plans are equal, not just close (the transform tests check it).
    For a batch of 32 this costs ~0.07 ms per image against ~0.2 ms one at a time, where NumPy's per-call
    overhead dominates (``benchmarks/bench_postprocess.py``).

    Args:
        sizes: ``B`` source image sizes ``(width, height)`` in pixels (>= 1).
        boxes, labels, difficult: ``B`` tensors each, as for :func:`plan_augmentation`.
        options: which steps to apply (the same for the whole batch).
        generators: ``B`` CPU generators, one per image.

    Returns:
        ``B`` :class:`AugmentPlan`, in order.
    """
    name = "plan_augmentations"
    if not isinstance(options, AugmentOptions):
        raise TypeError(f"{name}: expected options as an AugmentOptions, got {type(options).__name__}")
    b = len(sizes)
    if not len(boxes) == len(labels) == len(difficult) == len(generators) == b:
        raise ValueError(f"{name}: expected as many boxes, labels, difficult and generators as sizes ({b}), got "
                         f"{len(boxes)}, {len(labels)}, {len(difficult)} and {len(generators)}")
    for generator in generators:
        _check_generator(name, generator)
    for (width, height), *targets in zip(sizes, boxes, labels, difficult, strict=True):
        _check_plan_input(name, width, height, *targets)
    if b == 0:
        return []
    photometric_draws = PHOTOMETRIC_DRAWS if options.photometric else 0
    expand_draws = 4 if options.expand else 0
    crop_draws = 1 + 4 * CROP_TRIALS if options.crop else 0
    n = photometric_draws + expand_draws + crop_draws + int(options.flip)  # one generator call: the same stream
    draws = torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in generators]).numpy()  # [B, n]
    expand_at = photometric_draws
    crop_at = expand_at + expand_draws
    photometric = [photometric_from_uniforms(row, channel_swap=options.channel_swap) if options.photometric else None
                   for row in draws[:, :photometric_draws].tolist()]  # fmt: skip

    size = np.array(sizes, dtype=np.int64).reshape(b, 2)  # [B, 2] (width, height)
    width, height = size.T  # [B] each
    canvas = np.zeros((b, 4), dtype=np.int64)  # [B, 4] (width, height, left, top)
    canvas[:, :2] = size
    if options.expand:
        canvas = _expansions(canvas, options.expand_max_ratio, draws[:, expand_at:crop_at])
    counts = [len(x) for x in boxes]
    valid = np.arange(max(counts, default=0)) < np.array(counts)[:, None]  # [B, G]
    boxes_px = np.full((*valid.shape, 4), np.nan)  # [B, G, 4] canvas pixels, NaN padding
    scale = size[:, [0, 1, 0, 1]].astype(np.float64)  # [B, 4]
    offset = canvas[:, [2, 3, 2, 3]].astype(np.float64)  # [B, 4]
    for i, x in enumerate(boxes):
        boxes_px[i, : counts[i]] = x.detach().cpu().to(torch.float64).numpy() * scale[i] + offset[i]
    window = np.zeros((b, 4), dtype=np.int64)  # [B, 4] the whole canvas unless cropped
    window[:, 2:] = canvas[:, :2]
    keep = valid
    if options.crop:
        window, keep = _crops(boxes_px, valid, canvas[:, 0], canvas[:, 1], draws[:, crop_at : crop_at + crop_draws])

    lower = window[:, None, [0, 1, 0, 1]].astype(np.float64)  # [B, 1, 4]
    upper = window[:, None, [2, 3, 2, 3]].astype(np.float64)
    flip = draws[:, n - 1] < 0.5 if options.flip else np.zeros(b, dtype=bool)  # [B]
    with np.errstate(invalid="ignore"):  # the NaN padding
        out = ((np.minimum(np.maximum(boxes_px, lower), upper) - lower) / (upper - lower)).astype(np.float32)
        if flip.any():  # x0, x1 -> 1 - x1, 1 - x0
            mirrored = out[flip][..., [2, 1, 0, 3]]
            mirrored[..., [0, 2]] = 1 - mirrored[..., [0, 2]]
            out[flip] = mirrored
        out = np.minimum(np.maximum(out, 0.0), 1.0)  # [B, G, 4]
        good = keep & np.isfinite(out).all(axis=2) & (out[..., 2] > out[..., 0]) & (out[..., 3] > out[..., 1])
    plans = []
    for i in range(b):
        select = np.flatnonzero(good[i])  # kept boxes with positive area, in their original order
        index = torch.from_numpy(select)
        plans.append(AugmentPlan(
            int(width[i]), int(height[i]), photometric[i], Expansion(*(int(v) for v in canvas[i])),
            tuple(int(v) for v in window[i]), bool(flip[i]), torch.from_numpy(np.ascontiguousarray(out[i, select])),
            labels[i].to(torch.int64)[index], difficult[i].to(torch.bool)[index],
        ))  # fmt: skip
    return plans


def decode_reduction(plan: AugmentPlan, size: int) -> int:
    """Largest ``r`` in 1, 2, 4, 8 with the crop window at least ``r * size`` canvas pixels on both sides.

    Decoding the image at ``1 / r`` then still leaves at least one source pixel per output pixel, so
    :func:`render_augmentation` with ``reduction=r`` loses no resolution the output can show.
    """
    _check_size("decode_reduction", size)
    x0, y0, x1, y1 = plan.window
    side = min(x1 - x0, y1 - y0)
    return next((r for r in DECODE_REDUCTIONS if side >= r * size), 1)


def reduced_size(width: int, height: int, reduction: int) -> tuple[int, int]:
    """(width, height) of an image decoded at ``1 / reduction``: ``ceil`` of each side, as JPEG decoders do."""
    return -(-width // reduction), -(-height // reduction)


def render_augmentation(image: Tensor, plan: AugmentPlan, size: int, *, reduction: int = 1) -> Tensor:
    """The output image of ``plan``: photometric, expansion, crop, resize and flip (module docstring).

    Args:
        image: uint8 ``[3, H, W]`` RGB, any memory layout; with ``reduction = r`` the image decoded at
            ``1 / r``, of size :func:`reduced_size` of the plan's size. Not modified.
        plan: from :func:`plan_augmentation` for this image's size.
        size: output side S.
        reduction: 1 (full resolution), 2, 4 or 8.

    Returns:
        uint8 ``[3, S, S]``, contiguous.
    """
    name = "render_augmentation"
    _check_image(name, image)
    _check_size(name, size)
    if reduction not in (1, *DECODE_REDUCTIONS):
        raise ValueError(f"{name}: expected reduction 1, 2, 4 or 8, got {reduction!r}")
    want = reduced_size(plan.width, plan.height, reduction)
    if (image.shape[2], image.shape[1]) != want:
        raise ValueError(f"{name}: expected a {want[0]}x{want[1]} image (the plan's {plan.width}x{plan.height} "
                         f"at 1/{reduction}), got {image.shape[2]}x{image.shape[1]}")
    e, (x0, y0, x1, y1) = plan.expansion, plan.window
    photometric = plan.photometric if plan.photometric is not None and not plan.photometric.is_identity else None
    if reduction == 1:
        # The image's part of the window: the only pixels the output reads, so the only ones distorted.
        ix0, iy0 = max(x0, e.left), max(y0, e.top)
        ix1, iy1 = min(x1, e.left + plan.width), min(y1, e.top + plan.height)
        if ix1 <= ix0 or iy1 <= iy0:
            out = _fill_image(size)
        else:
            region = image[:, iy0 - e.top : iy1 - e.top, ix0 - e.left : ix1 - e.left]
            if photometric is not None:
                region = apply_photometric(region, photometric)  # float32 [3, h, w]
            out = _resize_window(region, e._replace(left=ix0, top=iy0), plan.window, size)
    else:
        rows = _axis_taps(y0, y1 - y0, size, e.top, plan.height, reduction, image.shape[1])
        cols = _axis_taps(x0, x1 - x0, size, e.left, plan.width, reduction, image.shape[2])
        if rows.lo == rows.hi or cols.lo == cols.hi:
            out = _fill_image(size)
        else:
            region = image[:, rows.lo : rows.hi, cols.lo : cols.hi]
            if photometric is not None:
                region = apply_photometric(region, photometric)
            out = _resample(region, _shifted(rows), _shifted(cols), size)
    return out.flip(-1) if plan.flip else out


def train_transform(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    difficult: Tensor,
    *,
    size: int,
    options: AugmentOptions,
    generator: torch.Generator,
) -> Sample:
    """The SSD training augmentation (see the module docstring).

    Args:
        image: uint8 ``[3, H, W]`` RGB.
        boxes: float ``[G, 4]`` xyxy normalised to [0, 1].
        labels: int64 ``[G]`` class indices.
        difficult: bool ``[G]`` VOC difficult flags.
        size: output side S.
        options: which steps to apply.
        generator: the only source of randomness (CPU).

    Returns:
        :class:`Sample` with a uint8 ``[3, S, S]`` image and the surviving boxes, labels and flags.
    """
    name = "train_transform"
    _check_image(name, image)
    _check_size(name, size)
    if not isinstance(options, AugmentOptions):
        raise TypeError(f"{name}: expected options as an AugmentOptions, got {type(options).__name__}")
    _check_generator(name, generator)
    height, width = image.shape[1:]
    plan = plan_augmentation(width, height, boxes, labels, difficult, options=options, generator=generator)
    return Sample(render_augmentation(image, plan, size), plan.boxes, plan.labels, plan.difficult)


def normalize_images(images: Tensor) -> Tensor:
    """uint8 ``[B, 3, H, W]`` (any device, any memory format) -> float32 ``(x / 255 - mean) / std``.

    Computed as one fused ``x * (1 / (255 std)) - mean / std`` (``torch.addcmul``).
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"normalize_images: expected uint8 images, got {got}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_images: expected images [B, 3, H, W], got {list(images.shape)}")
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float64)
    std = torch.tensor(IMAGE_STD, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).to(device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    shift = (-mean / std).to(device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return torch.addcmul(shift, images.to(torch.float32), scale)
