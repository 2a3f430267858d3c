"""Box geometry: format conversion, IoU, clipping and validation.

Formats (see STYLE.md):
- ``xyxy``: (x1, y1, x2, y2) with x1 < x2 and y1 < y2; inside ``ssd_core`` normalised to [0, 1].
- ``cxcywh``: (cx, cy, w, h), centre and size; priors use this format.

All functions accept any leading batch shape ``[..., 4]`` unless stated otherwise and never edit
their arguments in place.

:func:`box_iou` is the one IoU of the package: augmentation (crop constraints), matching, NMS and the
VOC metric all compute it. Two callers need a faster form and keep one beside their code, each computing
the same floating-point operations in the same order and tested to give the same bits:
:func:`ssd_core.matching.prior_gt_iou` (shares work across the prior grid's repeated intervals) and the
in-place, cache-sized tiles of :mod:`ssd_core.postprocess` (NMS).
"""

from __future__ import annotations

import torch
from torch import Tensor


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert ``[..., 4]`` corner boxes (x1, y1, x2, y2) to centre form (cx, cy, w, h)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert ``[..., 4]`` centre boxes (cx, cy, w, h) to corner form (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_area(boxes: Tensor, *, offset: float = 0.0) -> Tensor:
    """Area of ``[..., 4]`` xyxy boxes -> ``[...]``; inverted boxes give 0, never a negative area.

    ``offset`` is added to every width and height before clamping (see :func:`box_iou`).
    """
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    if offset:
        w, h = w + offset, h + offset
    return w.clamp(min=0) * h.clamp(min=0)


def box_intersection(a: Tensor, b: Tensor, *, offset: float = 0.0) -> Tensor:
    """Pairwise intersection areas of xyxy boxes ``a [..., N, 4]`` and ``b [..., M, 4]`` -> ``[..., N, M]``.

    ``offset`` is added to the overlap's width and height before clamping (see :func:`box_iou`).
    """
    top_left = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])  # [..., N, M, 2]
    bottom_right = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])  # [..., N, M, 2]
    wh = bottom_right - top_left  # [..., N, M, 2]
    if offset:
        wh = wh + offset
    wh = wh.clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(a: Tensor, b: Tensor, *, offset: float = 0.0) -> Tensor:
    """Pairwise IoU (Jaccard overlap) of xyxy boxes.

    Args:
        a: ``[..., N, 4]`` boxes (x1, y1, x2, y2).
        b: ``[..., M, 4]`` boxes in the same space as ``a``; leading dims broadcast (e.g. ``a [D, 1, 4]``
            and ``b [D, G, 4]`` compare each of D boxes with its own G boxes -> ``[D, 1, G]``).
        offset: added to every width and height: 0 for continuous coordinates, 1 for inclusive integer
            pixel coordinates (a box from pixel 0 to pixel 9 is 10 pixels wide), as the VOC devkit counts.

    Returns:
        ``[..., N, M]`` IoU in [0, 1], in the dtype of the boxes. A pair whose union is empty (two degenerate
        boxes) has IoU 0.
    """
    inter = box_intersection(a, b, offset=offset)  # [..., N, M]
    union = box_area(a, offset=offset)[..., :, None] + box_area(b, offset=offset)[..., None, :] - inter  # [..., N, M]
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(inter.dtype).tiny), 0.0)


def clip_boxes(boxes: Tensor, width: float = 1.0, height: float = 1.0) -> Tensor:
    """Clamp ``[..., 4]`` xyxy boxes to the image ``[0, width] x [0, height]`` (default: unit square)."""
    x = boxes[..., 0::2].clamp(0.0, width)
    y = boxes[..., 1::2].clamp(0.0, height)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def degenerate_box_mask(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """``[..., 4]`` xyxy boxes -> bool ``[...]``: True where a box is non-finite or has a side <= ``min_size``."""
    finite = torch.isfinite(boxes).all(dim=-1)
    wide = (boxes[..., 2] - boxes[..., 0]) > min_size
    tall = (boxes[..., 3] - boxes[..., 1]) > min_size
    return ~(finite & wide & tall)


def validate_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """Raise ``ValueError`` unless ``boxes`` is ``[N, 4]`` xyxy with finite values and positive area.

    The message names the first offending index and its values, e.g.
    ``boxes[3] = [0.5, 0.2, 0.4, 0.6]: x2 must be greater than x1``.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape [N, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {boxes.dtype}")
    bad = degenerate_box_mask(boxes)
    if not bad.any():
        return
    index = int(bad.nonzero()[0, 0])
    values = [round(float(v), 6) for v in boxes[index]]
    x1, y1, x2, y2 = boxes[index].tolist()
    if not torch.isfinite(boxes[index]).all():
        reason = "values must be finite"
    elif x2 <= x1:
        reason = "x2 must be greater than x1"
    else:
        reason = "y2 must be greater than y1"
    raise ValueError(f"{name}[{index}] = {values}: {reason} (xyxy boxes need finite values and positive area)")
