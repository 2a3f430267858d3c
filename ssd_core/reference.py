"""Slow, obviously correct reference implementations: the rules written out one image, box or prior at a time.

The fast code is vectorised, batched and tuned; these follow the docstrings of the fast code literally, with
Python loops, and the tests check the fast code against them on random inputs (as torchvision checks its
``nms`` against ``_reference_nms``). They are for tests and benchmarks, far too slow for training.

- :func:`reference_assign_targets` for :func:`ssd_core.matching.assign_targets`;
- :func:`reference_multibox_loss` and :func:`reference_hard_negative_mask` for :mod:`ssd_core.loss`;
- :func:`reference_train_transform` (with :func:`canvas_window` and :func:`reference_resize`) for
  :mod:`ssd_core.augment`: the augmentation chain as the original SSD and most ports run it.
"""

from __future__ import annotations

import math

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
from ssd_core.boxes import box_iou, cxcywh_to_xyxy
from ssd_core.coding import DEFAULT_VARIANCES, encode_boxes
from ssd_core.matching import IGNORE_LABEL


# ------------------------------------------------------------------------------------------------ matching
def reference_assign_targets(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_mask: Tensor,
    priors: Tensor,
    iou_threshold: float = 0.5,
    gt_difficult: Tensor | None = None,
    variances: tuple[float, float] = DEFAULT_VARIANCES,
) -> tuple[Tensor, Tensor]:
    """The matching rules of :mod:`ssd_core.matching`, one image, box and prior at a time.

    Args and shapes as :func:`ssd_core.matching.assign_targets`: ``gt_boxes [B, G, 4]`` xyxy, ``gt_labels
    [B, G]``, ``gt_mask [B, G]``, ``priors [P, 4]`` cxcywh, ``gt_difficult [B, G]`` or None.

    Returns:
        ``(loc_targets [B, P, 4], cls_targets [B, P] int64)``.
    """
    num_images, num_gt = gt_mask.shape
    num_priors = len(priors)
    cls = torch.zeros(num_images, num_priors, dtype=torch.long)
    loc = torch.zeros(num_images, num_priors, 4)
    for b in range(num_images):
        valid = [g for g in range(num_gt) if gt_mask[b, g]]
        regular = [g for g in valid if gt_difficult is None or not gt_difficult[b, g]]
        hard = [g for g in valid if g not in regular]
        iou = box_iou(gt_boxes[b], cxcywh_to_xyxy(priors)).tolist()  # [G][P]
        matched = {}
        for p in range(num_priors):  # threshold matches: the best regular box, the earlier one on ties
            best_g, best_v = None, -1.0
            for g in regular:
                if iou[g][p] > best_v:
                    best_g, best_v = g, iou[g][p]
            if best_g is not None and best_v >= iou_threshold:
                matched[p] = best_g
        claimed, pending, forced = set(), list(regular), {}
        while pending:  # forced matches: rounds of proposals
            proposals = {}
            for g in pending:
                free = [p for p in range(num_priors) if p not in claimed]
                if free:
                    proposals[g] = max(free, key=lambda p, g=g: (iou[g][p], -p))  # best IoU, lowest index
            by_prior = {}
            for g, p in proposals.items():
                by_prior.setdefault(p, []).append(g)
            pending = []
            for p, boxes in by_prior.items():
                winner = max(boxes, key=lambda g, p=p: (iou[g][p], g))  # higher IoU, later box on ties
                forced[winner] = p
                claimed.add(p)
                pending += [g for g in boxes if g != winner]
        for g, p in forced.items():
            matched[p] = g
        for p, g in matched.items():
            cls[b, p] = int(gt_labels[b, g])
            loc[b, p] = encode_boxes(gt_boxes[b, g], priors[p], variances)
        for g in hard:
            best_p = max(range(num_priors), key=lambda p, g=g: (iou[g][p], -p))
            for p in range(num_priors):
                if p not in matched and (iou[g][p] >= iou_threshold or p == best_p):
                    cls[b, p] = IGNORE_LABEL
    return loc, cls


# ---------------------------------------------------------------------------------------------------- loss
def reference_hard_negative_mask(
    conf_loss: Tensor, positive: Tensor, neg_pos_ratio: float, ignore: Tensor | None = None
) -> Tensor:
    """:func:`ssd_core.loss.hard_negative_mask` by sorting each image's negatives: ``conf_loss [B, P]``,
    ``positive [B, P]`` bool, ``ignore [B, P]`` bool or None -> bool ``[B, P]``."""
    mask = torch.zeros_like(positive)
    for b in range(conf_loss.shape[0]):
        pool = [p for p in range(conf_loss.shape[1]) if not positive[b, p] and (ignore is None or not ignore[b, p])]
        keep = min(math.floor(neg_pos_ratio * int(positive[b].sum())), len(pool))
        for p in sorted(pool, key=lambda p: -float(conf_loss[b, p]))[:keep]:
            mask[b, p] = True
    return mask


def reference_multibox_loss(
    loc_pred: Tensor,
    logits: Tensor,
    loc_targets: Tensor,
    cls_targets: Tensor,
    neg_pos_ratio: float = 3,
    alpha: float = 1.0,
    normalize: str = "batch",
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss of :mod:`ssd_core.loss`, one image and one prior at a time, in float64 (autograd gives the
    gradients).

    Args and shapes as :func:`ssd_core.loss.multibox_loss`: ``loc_pred [B, P, 4]``, ``logits [B, P, C]``,
    ``loc_targets [B, P, 4]``, ``cls_targets [B, P]`` (1..C-1 positive, 0 background, -1 ignored).

    Returns:
        ``(total, loc, conf)``, float64 0-d tensors.
    """
    num_images, num_priors, _ = logits.shape
    loc_terms, conf_terms, counts = [], [], []
    for b in range(num_images):
        log_prob = torch.log_softmax(logits[b].double(), dim=-1)  # [P, C]
        labels = cls_targets[b].tolist()
        positives = [p for p in range(num_priors) if labels[p] > 0]
        negatives = [p for p in range(num_priors) if labels[p] == 0]
        background_loss = (-log_prob[:, 0]).tolist()
        keep = min(math.floor(neg_pos_ratio * len(positives)), len(negatives))
        mined = sorted(negatives, key=lambda p: -background_loss[p])[:keep]
        conf = sum((-log_prob[p, labels[p]] for p in positives), torch.zeros((), dtype=torch.float64))
        conf = conf + sum((-log_prob[p, 0] for p in mined), torch.zeros((), dtype=torch.float64))
        loc = sum(
            (F.smooth_l1_loss(loc_pred[b, p].double(), loc_targets[b, p].double(), reduction="sum") for p in positives),
            torch.zeros((), dtype=torch.float64),
        )
        loc_terms.append(loc)
        conf_terms.append(conf)
        counts.append(len(positives))
    if normalize == "batch":
        total_n = max(sum(counts), 1)
        loc, conf = sum(loc_terms) / total_n, sum(conf_terms) / total_n
    else:
        loc = sum(t / max(n, 1) for t, n in zip(loc_terms, counts, strict=True)) / num_images
        conf = sum(t / max(n, 1) for t, n in zip(conf_terms, counts, strict=True)) / num_images
    return conf + alpha * loc, loc, conf


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
