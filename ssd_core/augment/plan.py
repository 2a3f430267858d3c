"""Planning one image's augmentation: every random draw and all the box geometry, from the image size alone.

:func:`plan_augmentation` is the readable, one-image planner and the reference for the vectorised
:func:`ssd_core.augment.batch.plan_augmentations`, which must give exactly the same plans. It draws from the
``torch.Generator`` argument, in this order: photometric (11 numbers), expansion (4), crop (1 + 4 x 50),
flip (1); a disabled step draws nothing. :func:`ssd_core.augment.render.render_augmentation` then makes the
plan's pixels.

Expansion ("zoom out", probability 1/2): the image is placed at a random integer offset on a canvas
``ratio`` times its size, ``ratio ~ U(1, expand_max_ratio)``, filled with the dataset mean colour.

Min-IoU random crop: one of seven options with equal probability: the whole image, a crop whose IoU with at
least one box is >= 0.1 / 0.3 / 0.5 / 0.7 / 0.9 (Caffe's ``SatisfySampleConstraint``), or any crop; up to 50
trials of side 0.3..1 times the canvas side and aspect ratio h/w in [0.5, 2]; a trial must keep at least one
box, a box is kept when its centre lies strictly inside the crop, then it is clipped to the crop. When no
trial succeeds the image stays uncropped (the original drew another option, looping forever on some
images). An image without boxes has no IoU or centre constraint: it gets a random crop of the allowed shape
(or none) and an empty box set.

Output boxes that end up degenerate (zero width or height after clipping and float rounding) are dropped
with their labels and difficult flags, so every output box is finite with positive area.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ssd_core.augment.options import CROP_ASPECT_RANGE, CROP_MIN_IOUS, CROP_MIN_SCALE, CROP_TRIALS, AugmentOptions
from ssd_core.augment.photometric import PhotometricParams, sample_photometric
from ssd_core.boxes import box_iou


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
    """Everything the augmentation draws and computes before touching a pixel.

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


def _sample_crop_np(
    boxes_px: np.ndarray, width: int, height: int, generator: torch.Generator, max_trials: int
) -> tuple[tuple[int, int, int, int] | None, np.ndarray, float | None]:
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
        ok &= box_iou(torch.from_numpy(rects), torch.from_numpy(boxes_px)).numpy().max(axis=1) >= min_iou
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
    """Draw every random choice of the augmentation and compute the output boxes, without pixels.

    Args:
        width, height: source image size in pixels (>= 1).
        boxes: float ``[G, 4]`` xyxy normalised to [0, 1].
        labels: int64 ``[G]`` class indices.
        difficult: bool ``[G]`` VOC difficult flags.
        options: which steps to apply.
        generator: the only source of randomness (CPU); draws in the order of the module docstring.

    Returns:
        :class:`AugmentPlan`; :func:`ssd_core.augment.render.render_augmentation` makes its image.
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
        crop, inside, _ = _sample_crop_np(
            boxes_px, expansion.canvas_width, expansion.canvas_height, generator, CROP_TRIALS
        )
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
        width,
        height,
        photometric,
        expansion,
        window,
        flip,
        torch.from_numpy(np.ascontiguousarray(out[good])),
        labels.to(torch.int64)[select],
        difficult.to(torch.bool)[select],
    )
