"""Slow, obviously correct reference implementations: the rules written out one image, box or prior at a time.

The fast code is vectorised, batched and tuned; these follow the docstrings of the fast code literally, with
Python loops, and the tests check the fast code against them on random inputs (as torchvision checks its
``nms`` against ``_reference_nms``). They are for tests and benchmarks, far too slow for training.

- :func:`reference_train_transform` (with :func:`canvas_window` and :func:`reference_resize`) for
  :mod:`ssd_core.augment`: the augmentation chain as the original SSD and most ports run it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssd_core.augment import (
    FILL_COLOUR,
    AugmentOptions,
    Expansion,
    Sample,
    photometric_distort,
    sample_crop,
    sample_expansion,
)


# ------------------------------------------------------------------------------------------------ augment
def canvas_window(image: Tensor, expansion: Expansion, window: tuple[int, int, int, int] | None = None) -> Tensor:
    """Pixels ``window`` of the expansion canvas (the whole canvas when None), as float32.

    The literal canvas that :mod:`ssd_core.augment.render` samples without building it.

    Args:
        image: ``[3, H, W]`` image placed at ``(expansion.left, expansion.top)``.
        expansion: the canvas; outside the image it has :data:`ssd_core.augment.FILL_COLOUR`.
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


def reference_resize(image: Tensor, size: int) -> Tensor:
    """float or uint8 ``[3, h, w]`` -> uint8 ``[3, size, size]`` with ``interpolate`` (bilinear, no antialias).

    The literal resize that the separable one of :mod:`ssd_core.augment.render` is checked against.
    """
    x = image if image.is_floating_point() else image.float()
    if tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False)[0]
    return x.round().clamp_(0.0, 255.0).to(torch.uint8)


def reference_train_transform(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    difficult: Tensor,
    *,
    size: int,
    options: AugmentOptions,
    generator: torch.Generator,
) -> Sample:
    """:func:`ssd_core.augment.train_transform` written out literally: photometric on the whole image in float,
    the whole zoom-out canvas built, the crop window cut out of it and resized with ``interpolate``, then the
    flip. Draws the same numbers in the same order (:mod:`ssd_core.augment.plan`); the same arguments and
    result as ``train_transform``, with images equal up to float rounding (at most 1 grey level)."""
    height, width = image.shape[1:]
    x = image.float()
    if options.photometric:
        x = photometric_distort(x, generator, channel_swap=options.channel_swap)
    e = Expansion(width, height, 0, 0)
    if options.expand:
        e = sample_expansion(width, height, options.expand_max_ratio, generator)
    boxes_px = boxes.double() * torch.tensor([width, height] * 2) + torch.tensor([e.left, e.top] * 2)
    window, keep = (0, 0, e.canvas_width, e.canvas_height), torch.ones(len(boxes), dtype=torch.bool)
    if options.crop:
        choice = sample_crop(boxes_px, e.canvas_width, e.canvas_height, generator)
        if choice.window is not None:
            window, keep = choice.window, choice.keep
    x0, y0, x1, y1 = window
    out = reference_resize(canvas_window(x, e)[:, y0:y1, x0:x1], size)
    lo, hi = torch.tensor([x0, y0] * 2, dtype=torch.float64), torch.tensor([x1, y1] * 2, dtype=torch.float64)
    out_boxes = ((torch.minimum(torch.maximum(boxes_px[keep], lo), hi) - lo) / (hi - lo)).float()
    if options.flip and float(torch.rand((), generator=generator, dtype=torch.float64)) < 0.5:
        out = out.flip(-1)
        out_boxes = torch.stack((1 - out_boxes[:, 2], out_boxes[:, 1], 1 - out_boxes[:, 0], out_boxes[:, 3]), -1)
    out_boxes = out_boxes.clamp(0, 1)
    good = (out_boxes[:, 2] > out_boxes[:, 0]) & (out_boxes[:, 3] > out_boxes[:, 1])
    return Sample(out, out_boxes[good], labels[keep][good], difficult[keep][good])
