"""Planning a batch of augmentations at once, vectorised: exactly the plans of one image at a time.

The reference is :mod:`ssd_core.augment.plan` (:func:`~ssd_core.augment.plan.plan_augmentation`, whose rules
and draws are described there): every value here comes from the same floating-point operations as there, in
one NumPy pass over the whole batch instead of one per image. For a loader that makes batches this is the
point: NumPy's per-call overhead, not arithmetic, is most of planning one image, and here it is paid once per
batch (``benchmarks/bench_postprocess.py`` measures both). ``tests/ssd_core/augment/test_batch.py`` checks
that the plans are equal, not just close.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ssd_core.augment.options import CROP_ASPECT_RANGE, CROP_MIN_IOUS, CROP_MIN_SCALE, CROP_TRIALS, AugmentOptions
from ssd_core.augment.photometric import PHOTOMETRIC_DRAWS, photometric_from_uniforms
from ssd_core.augment.plan import AugmentPlan, Expansion, _check_generator, _check_plan_input
from ssd_core.boxes import box_iou


def _expansions(canvas: np.ndarray, max_ratio: float, draws: np.ndarray) -> np.ndarray:
    """:func:`~ssd_core.augment.plan.sample_expansion` for ``B`` images at once: int64 ``[B, 4]`` rows ``(width,
    height, 0, 0)`` and float64 ``[B, 4]`` draws -> int64 ``[B, 4]`` rows ``(canvas_width, canvas_height, left,
    top)``."""
    size = canvas[:, :2]  # [B, 2]
    expanded = canvas.copy()
    expanded[:, :2] = size * (1.0 + (max_ratio - 1.0) * draws[:, 1:2])  # int(side * ratio): truncated
    slack = expanded[:, :2] - size  # [B, 2] positions for the image's corner: 0..slack
    expanded[:, 2:] = np.minimum(draws[:, 2:] * (slack + 1), slack)  # truncated, then at most slack
    return np.where((draws[:, :1] < 0.5) & (max_ratio > 1.0), expanded, canvas)


def _crops(
    boxes_px: np.ndarray, valid: np.ndarray, width: np.ndarray, height: np.ndarray, draws: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`~ssd_core.augment.plan.sample_crop` for ``B`` canvases at once, all trials of all canvases in one pass.

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
    # minimum and some box centre must lie strictly inside (box_iou gives a non-finite box IoU 0, and a NaN
    # centre is never inside).
    with np.errstate(divide="ignore", invalid="ignore"):  # NaN padding (never inside), non-finite boxes
        iou = box_iou(torch.from_numpy(rects), torch.from_numpy(boxes_px)).numpy()  # [B, T, G]
        iou = np.where(valid[:, None], iou, -np.inf)  # padding never counts
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
    """:func:`~ssd_core.augment.plan.plan_augmentation` for a batch of images: exactly the same plans, computed
    together.

    Each image draws from its own generator exactly what ``plan_augmentation`` draws, in one call (the same
    stream), so a plan does not depend on the rest of the batch. The geometry of all images (expansion, every
    crop trial, the output boxes) is then computed in one vectorised pass, boxes padded to the batch's largest
    count with NaN rows that no step keeps. Every value comes from the same floating-point operations as in
    ``plan_augmentation``, so the plans are equal, not just close.

    Args:
        sizes: ``B`` source image sizes ``(width, height)`` in pixels (>= 1).
        boxes, labels, difficult: ``B`` tensors each, as for ``plan_augmentation``.
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
        raise ValueError(
            f"{name}: expected as many boxes, labels, difficult and generators as sizes ({b}), got "
            f"{len(boxes)}, {len(labels)}, {len(difficult)} and {len(generators)}"
        )
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
    photometric = [
        photometric_from_uniforms(row, channel_swap=options.channel_swap) if options.photometric else None
        for row in draws[:, :photometric_draws].tolist()
    ]

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
        plans.append(
            AugmentPlan(
                int(width[i]),
                int(height[i]),
                photometric[i],
                Expansion(*(int(v) for v in canvas[i])),
                tuple(int(v) for v in window[i]),
                bool(flip[i]),
                torch.from_numpy(np.ascontiguousarray(out[i, select])),
                labels[i].to(torch.int64)[index],
                difficult[i].to(torch.bool)[index],
            )
        )
    return plans
