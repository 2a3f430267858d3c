"""The pixels of an augmentation plan: photometric distortion, expansion, crop, resize and flip.

The output equals the literal chain (:func:`ssd_core.reference.reference_train_transform`: photometric on the
whole image, the whole zoom-out canvas built, the crop window cut out and resized with ``interpolate``, then
the flip) up to float rounding, at most 1 grey level in rare pixels, for much less work. It never builds the
zoomed-out canvas (up to 16 times the image) and touches only the source pixels the output reads:

- the photometric steps act on one pixel at a time, so they are applied only to the part of the image
  inside the crop window: exactly the values the full-image order gives there (the order of the steps is
  unchanged, the resize still comes after them);
- the resize (bilinear, ``align_corners=False``, no antialiasing, like the original ``cv2.resize``, rounded
  back to uint8) is separable: each output row (column) is the weighted sum of two source rows (columns),
  with the bilinear weights of ``interpolate(align_corners=False)`` on the canvas window; a tap that falls
  on the canvas instead of the image contributes the fill colour with its weight. Rows first (one
  ``embedding_bag``: gather and weighted sum in one pass), then columns. The flip mirrors the uint8 result.

Reduced-resolution sources (for decoders that can decode an image at ``1 / r`` of its size, such as a
JPEG's DCT scaling): ``render_augmentation(..., reduction=r)`` takes the image reduced by ``r`` (``ceil(W /
r) x ceil(H / r)``; reduced pixel ``j`` covers full pixels ``[j r, (j + 1) r)``, so its centre is at ``(j +
0.5) r - 0.5``) and samples it at the same canvas positions, with the same fill share at the image's
border. Use it only when the window is at least ``r * size`` pixels on both sides, so each output pixel
still spans at least one reduced pixel. The result is close to, not equal to, the full-resolution one: a
decoder's scaling averages each r x r block where the plain bilinear resize reads 2 x 2 pixels and skips
the rest, so fine texture aliases less (the tests bound the difference and check the reduced result is no
farther than the full one from an antialiased resize). The geometry and the boxes are identical.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssd_core.augment.normalize import IMAGE_MEAN
from ssd_core.augment.options import AugmentOptions
from ssd_core.augment.photometric import apply_photometric
from ssd_core.augment.plan import AugmentPlan, Expansion, _check_generator, plan_augmentation

FILL_COLOUR = tuple(255.0 * m for m in IMAGE_MEAN)  # expansion canvas, on the 0..255 scale


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


def _axis_taps(
    start: int, length: int, size: int, offset: int, image_len: int, reduction: int = 1, source_len: int | None = None
) -> _Taps:
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


def _weighted_rows(
    table: Tensor, taps: _Taps, blocks: int, extra: tuple[np.ndarray, np.ndarray] | None = None
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
    return F.embedding_bag(
        torch.from_numpy(bags.reshape(-1, bags.shape[2])),
        table,
        per_sample_weights=torch.from_numpy(weights),
        mode="sum",
    )


def _to_uint8(x: Tensor) -> Tensor:
    """float32 ``[3, S, S]`` (any strides) -> uint8, rounded to the nearest integer and clamped to [0, 255]."""
    x = x.round_().clamp_(0.0, 255.0)
    # NumPy's float-to-uint8 cast is faster than torch's on CPU; a strided result is cast first, then made
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
    """``reference_resize(canvas_window(image, expansion, window), size)`` (:mod:`ssd_core.reference`) without
    building the window.

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


def reduced_size(width: int, height: int, reduction: int) -> tuple[int, int]:
    """(width, height) of an image reduced by ``reduction``: ``ceil`` of each side, the last block partial."""
    return -(-width // reduction), -(-height // reduction)


def render_augmentation(image: Tensor, plan: AugmentPlan, size: int, *, reduction: int = 1) -> Tensor:
    """The output image of ``plan``: photometric, expansion, crop, resize and flip (module docstring).

    Args:
        image: uint8 ``[3, H, W]`` RGB, any memory layout; with ``reduction = r`` the image decoded at
            ``1 / r``, of size :func:`reduced_size` of the plan's size. Not modified.
        plan: from :func:`ssd_core.augment.plan.plan_augmentation` for this image's size.
        size: output side S.
        reduction: 1 (full resolution) or the integer factor ``r`` the source was reduced by.

    Returns:
        uint8 ``[3, S, S]``, contiguous.
    """
    name = "render_augmentation"
    _check_image(name, image)
    _check_size(name, size)
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"{name}: expected reduction as a positive int, got {reduction!r}")
    want = reduced_size(plan.width, plan.height, reduction)
    if (image.shape[2], image.shape[1]) != want:
        raise ValueError(
            f"{name}: expected a {want[0]}x{want[1]} image (the plan's {plan.width}x{plan.height} "
            f"at 1/{reduction}), got {image.shape[2]}x{image.shape[1]}"
        )
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
    """The SSD training augmentation: :func:`ssd_core.augment.plan.plan_augmentation`, then
    :func:`render_augmentation` (the chain is described in :mod:`ssd_core.augment`).

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
