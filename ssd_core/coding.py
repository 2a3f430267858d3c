"""Box coding: ground-truth boxes <-> regression targets relative to priors (the SSD / Faster R-CNN code).

For a box g (centre form) and a prior d (cx, cy, w, h), with variances (v_c, v_s) = (0.1, 0.2)::

    t_cx = (g_cx - d_cx) / (d_w * v_c)        t_w = log(g_w / d_w) / v_s
    t_cy = (g_cy - d_cy) / (d_h * v_c)        t_h = log(g_h / d_h) / v_s

The variances are the original Caffe model's "prior variances": dividing by them scales the targets
to roughly unit spread, which is what the released weights were trained with (torchvision writes the
same thing as weights (10, 10, 5, 5) = 1 / variances). ``decode_boxes`` is the exact inverse:
``decode_boxes(encode_boxes(b, d), d) == b`` up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_VARIANCES = (0.1, 0.2)  # (centre, size): the Caffe SSD prior variances


def _check(name: str, boxes: Tensor, priors: Tensor, variances: tuple[float, float]) -> None:
    if boxes.shape[-1:] != (4,) or priors.shape[-1:] != (4,):
        raise ValueError(
            f"{name}: expected [..., 4] boxes and [..., 4] priors, got {list(boxes.shape)} and {list(priors.shape)}"
        )
    if len(variances) != 2 or not all(v > 0 for v in variances):
        raise ValueError(f"{name}: expected variances as two positive numbers (centre, size), got {variances!r}")


def encode_boxes(
    boxes_xyxy: Tensor, priors_cxcywh: Tensor, variances: tuple[float, float] = DEFAULT_VARIANCES
) -> Tensor:
    """Regression targets of ``boxes_xyxy`` relative to ``priors_cxcywh``.

    Args:
        boxes_xyxy: ``[..., 4]`` boxes (x1, y1, x2, y2) with positive width and height.
        priors_cxcywh: ``[..., 4]`` priors (cx, cy, w, h) in the same space; broadcasts against ``boxes_xyxy``.
        variances: (centre, size) divisors, (0.1, 0.2) for SSD.

    Returns:
        ``[..., 4]`` targets (t_cx, t_cy, t_w, t_h), see the module docstring.
    """
    _check("encode_boxes", boxes_xyxy, priors_cxcywh, variances)
    v_centre, v_size = variances
    g_xy = (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:]) / 2  # [..., 2]
    g_wh = boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]  # [..., 2]
    d_xy, d_wh = priors_cxcywh[..., :2], priors_cxcywh[..., 2:]
    t_xy = (g_xy - d_xy) / (d_wh * v_centre)
    t_wh = torch.log(g_wh / d_wh) / v_size
    return torch.cat((t_xy, t_wh), dim=-1)


def decode_boxes(loc: Tensor, priors_cxcywh: Tensor, variances: tuple[float, float] = DEFAULT_VARIANCES) -> Tensor:
    """Inverse of :func:`encode_boxes`: regression outputs -> boxes.

    Args:
        loc: ``[..., 4]`` predicted (t_cx, t_cy, t_w, t_h).
        priors_cxcywh: ``[..., 4]`` priors (cx, cy, w, h); broadcasts against ``loc``.
        variances: the (centre, size) divisors used for encoding.

    Returns:
        ``[..., 4]`` boxes (x1, y1, x2, y2) in the priors' space (normalised [0, 1] for SSD priors; not clipped).
    """
    _check("decode_boxes", loc, priors_cxcywh, variances)
    v_centre, v_size = variances
    d_xy, d_wh = priors_cxcywh[..., :2], priors_cxcywh[..., 2:]
    xy = d_xy + loc[..., :2] * v_centre * d_wh  # [..., 2]
    half_wh = d_wh * torch.exp(loc[..., 2:] * v_size) / 2  # [..., 2]
    return torch.cat((xy - half_wh, xy + half_wh), dim=-1)
