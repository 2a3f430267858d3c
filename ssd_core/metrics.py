"""PASCAL VOC detection metrics: per-class average precision at one IoU threshold (0.5).

Two AP definitions, both from the VOC devkit (``VOCevaldet.m``):

* ``voc07``: the 11-point interpolated AP of VOC2007 and of the SSD paper: the mean over recall
  levels t in {0, 0.1, ..., 1} of the highest precision reached at a recall >= t.
* ``voc`` (VOC2010 and later): the area under the precision envelope (precision made monotonically
  non-increasing in recall), summed over the recall steps.

Matching follows the devkit exactly:

* detections of one class are visited by decreasing score over all images (a stable sort, like
  MATLAB's ``sort``, so ties keep their input order);
* each detection is compared with every ground-truth box of its class in its image, difficult ones
  included, and takes the one of highest IoU (the first on ties);
* IoU >= ``iou_threshold`` with a difficult box: the detection is ignored (neither TP nor FP);
  with a box not yet matched: true positive, the box is now matched; with a box already matched:
  false positive (duplicate); below the threshold or no box of the class: false positive;
* only ground truth that is not difficult counts toward the number of positives ``npos``.

Boxes are xyxy in any one consistent space (normalised or pixels: IoU does not care). The devkit adds
one pixel to widths and heights because VOC annotations are inclusive integer pixel coordinates;
``box_offset=1.0`` reproduces that, the default 0.0 treats boxes as continuous.

One deliberate difference from the devkit: the 11 recall levels are ``k / 10`` exactly. The devkit's
``0:0.1:1`` (and ``np.arange(0, 1.1, 0.1)`` in Python ports) gives 0.30000000000000004 for the
fourth level, so a recall of exactly 3/10 would not count as reaching 0.3.

A class with no non-difficult ground truth has no defined AP: it is NaN and left out of the mean.

Arrays here are NumPy (float64 for the statistics); inputs may be NumPy arrays or torch tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ssd_core.boxes import box_iou

ArrayLike = np.ndarray | torch.Tensor

_RECALL_LEVELS_07 = np.arange(11) / 10.0  # 0, 0.1, ..., 1.0, each the float nearest k/10
_MAX_PAIRS_PER_CHUNK = 2_000_000  # detections x padded ground truth compared in one vectorised block


class PRCurve(NamedTuple):
    """Precision-recall curve of one class, one point per counted detection (ignored ones dropped).

    recall [D], precision [D] float64; scores [D] decreasing; tp [D] bool (true positive or not).
    """

    recall: np.ndarray
    precision: np.ndarray
    scores: np.ndarray
    tp: np.ndarray


class VocResult(NamedTuple):
    """Per-class VOC AP at one IoU threshold. Index c - 1 holds class label c (1..C-1).

    map_voc07 / map_voc: mean over classes with at least one non-difficult ground-truth box (NaN if none).
    ap_voc07 / ap_voc [C-1] float64: NaN for a class without non-difficult ground truth.
    num_positives [C-1] int64: non-difficult ground-truth boxes per class (the devkit's npos).
    curves: C-1 ``PRCurve``.
    """

    map_voc07: float
    map_voc: float
    ap_voc07: np.ndarray
    ap_voc: np.ndarray
    num_positives: np.ndarray
    curves: list[PRCurve]


def voc_ap(recall: ArrayLike, precision: ArrayLike, *, use_07_metric: bool) -> float:
    """Average precision of one class from its PR curve, as the VOC devkit computes it.

    Args:
        recall: [D] recall after each detection, in detection order (non-decreasing), within [0, 1].
        precision: [D] precision after each detection.
        use_07_metric: True: VOC2007 11-point interpolation; False: VOC2010+ area under the envelope.

    Returns:
        AP in [0, 1]; 0.0 for an empty curve.
    """
    rec = _as_numpy(recall, "recall", np.float64).reshape(-1)
    prec = _as_numpy(precision, "precision", np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"voc_ap: recall and precision must have the same length, got {rec.shape} and {prec.shape}")
    if rec.size and np.any(np.diff(rec) < 0):
        raise ValueError("voc_ap: recall must be non-decreasing (one point per detection, in score order)")
    if rec.size == 0:
        return 0.0
    if use_07_metric:
        # The highest precision at recall >= t is a suffix maximum, because recall is sorted.
        suffix_max = np.maximum.accumulate(prec[::-1])[::-1]  # [D]
        first = np.searchsorted(rec, _RECALL_LEVELS_07, side="left")  # [11]: first point with rec >= t
        reached = first < rec.size
        p = np.where(reached, suffix_max[np.minimum(first, rec.size - 1)], 0.0)
        return float(p.sum() / 11.0)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def evaluate_voc(
    det_boxes: Sequence[ArrayLike],
    det_scores: Sequence[ArrayLike],
    det_labels: Sequence[ArrayLike],
    gt_boxes: Sequence[ArrayLike],
    gt_labels: Sequence[ArrayLike],
    gt_difficult: Sequence[ArrayLike] | None = None,
    *,
    num_classes: int,
    iou_threshold: float = 0.5,
    box_offset: float = 0.0,
) -> VocResult:
    """VOC07 11-point and VOC2010+ area AP for every class, with devkit matching (module docstring).

    Args:
        det_boxes: per image [K, 4] xyxy detections (same space as ``gt_boxes``).
        det_scores: per image [K] confidences.
        det_labels: per image [K] int labels in 1..C-1.
        gt_boxes: per image [G, 4] xyxy ground truth.
        gt_labels: per image [G] int labels in 1..C-1.
        gt_difficult: per image [G] bool, or None (nothing difficult).
        num_classes: C, background included.
        iou_threshold: a detection matches at IoU >= this (VOC: 0.5).
        box_offset: added to widths and heights (1.0: the devkit's inclusive pixel coordinates).

    Returns:
        ``VocResult``.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"evaluate_voc: num_classes must be an int >= 2 (background included), got {num_classes!r}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"evaluate_voc: iou_threshold must be in (0, 1], got {iou_threshold}")
    num_images = len(gt_boxes)
    lengths = {
        "det_boxes": len(det_boxes),
        "det_scores": len(det_scores),
        "det_labels": len(det_labels),
        "gt_boxes": num_images,
        "gt_labels": len(gt_labels),
    }
    if gt_difficult is not None:
        lengths["gt_difficult"] = len(gt_difficult)
    if len(set(lengths.values())) != 1:
        raise ValueError(f"evaluate_voc: expected one entry per image in every list, got lengths {lengths}")

    gt = _pad_ground_truth(gt_boxes, gt_labels, gt_difficult, num_classes)
    dets = _flatten_detections(det_boxes, det_scores, det_labels, num_classes)

    # Visit detections class by class, by decreasing score; lexsort is stable, so ties keep input order.
    order = np.lexsort((-dets.scores, dets.labels))  # [D]
    labels = dets.labels[order]
    scores = dets.scores[order]
    image = dets.image[order]
    ovmax, jmax = _best_overlaps(dets.boxes[order], labels, image, gt, box_offset)  # [D], [D]

    hit = ovmax >= iou_threshold
    hit_difficult = hit & gt.difficult[image, jmax]
    claims = hit & ~hit_difficult  # detections that claim a ground-truth box
    gt_key = image * gt.width + jmax  # [D] one id per ground-truth box (a box has one class)
    tp = np.zeros(order.size, dtype=bool)
    claiming = np.flatnonzero(claims)
    _, first = np.unique(gt_key[claiming], return_index=True)  # the first claim in score order wins
    tp[claiming[first]] = True
    counted = ~hit_difficult

    npos = np.bincount(gt.labels[~gt.difficult & (gt.labels > 0)], minlength=num_classes)[1:].astype(np.int64)
    bounds = np.searchsorted(labels, np.arange(1, num_classes + 1))  # class c occupies [bounds[c-1], bounds[c])
    ap07 = np.full(num_classes - 1, np.nan)
    ap = np.full(num_classes - 1, np.nan)
    curves = []
    for c in range(1, num_classes):
        segment = slice(bounds[c - 1], bounds[c])
        keep = counted[segment]
        tp_c = tp[segment][keep]
        ctp = np.cumsum(tp_c, dtype=np.float64)
        cfp = np.cumsum(~tp_c, dtype=np.float64)
        n = npos[c - 1]
        recall = ctp / n if n > 0 else np.full(ctp.shape, np.nan)
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        curves.append(PRCurve(recall, precision, scores[segment][keep], tp_c))
        if n > 0:
            ap07[c - 1] = voc_ap(recall, precision, use_07_metric=True)
            ap[c - 1] = voc_ap(recall, precision, use_07_metric=False)
    return VocResult(_nanmean(ap07), _nanmean(ap), ap07, ap, npos, curves)


# ---------------------------------------------------------------------------------------------- internals
class _PaddedGT(NamedTuple):
    boxes: np.ndarray  # [N, Gmax, 4] float64
    labels: np.ndarray  # [N, Gmax] int64, 0 = padding
    difficult: np.ndarray  # [N, Gmax] bool
    width: int  # Gmax (at least 1)


class _FlatDetections(NamedTuple):
    boxes: np.ndarray  # [D, 4] float64
    scores: np.ndarray  # [D] float64
    labels: np.ndarray  # [D] int64
    image: np.ndarray  # [D] int64


def _as_numpy(value: ArrayLike, name: str, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name}: expected an array or tensor, got {type(value).__name__}") from error
    return value.astype(dtype, copy=False)


def _check_boxes(boxes: np.ndarray, name: str) -> np.ndarray:
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: expected boxes of shape [N, 4] (xyxy), got {tuple(boxes.shape)}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{name}: boxes must be finite")
    return boxes


def _check_labels(labels: np.ndarray, num_classes: int, name: str) -> None:
    if labels.size and (labels.min() < 1 or labels.max() >= num_classes):
        raise ValueError(
            f"{name}: labels must be in 1..{num_classes - 1} (0 is background), "
            f"got values in [{labels.min()}, {labels.max()}]"
        )


def _pad_ground_truth(gt_boxes, gt_labels, gt_difficult, num_classes: int) -> _PaddedGT:
    boxes_list, labels_list, difficult_list = [], [], []
    for i in range(len(gt_boxes)):
        boxes = _check_boxes(_as_numpy(gt_boxes[i], f"gt_boxes[{i}]", np.float64), f"gt_boxes[{i}]")
        labels = _as_numpy(gt_labels[i], f"gt_labels[{i}]", np.int64).reshape(-1)
        if gt_difficult is None:
            difficult = np.zeros(labels.shape, dtype=bool)
        else:
            difficult = _as_numpy(gt_difficult[i], f"gt_difficult[{i}]", bool).reshape(-1)
        if not boxes.shape[0] == labels.shape[0] == difficult.shape[0]:
            raise ValueError(
                f"image {i}: gt_boxes, gt_labels and gt_difficult must have one entry per box, "
                f"got {boxes.shape[0]}, {labels.shape[0]}, {difficult.shape[0]}"
            )
        _check_labels(labels, num_classes, f"gt_labels[{i}]")
        boxes_list.append(boxes)
        labels_list.append(labels)
        difficult_list.append(difficult)
    width = max([1] + [b.shape[0] for b in boxes_list])
    n = len(boxes_list)
    padded_boxes = np.zeros((n, width, 4))
    padded_labels = np.zeros((n, width), dtype=np.int64)
    padded_difficult = np.zeros((n, width), dtype=bool)
    for i, (b, lab, d) in enumerate(zip(boxes_list, labels_list, difficult_list, strict=True)):
        padded_boxes[i, : b.shape[0]] = b
        padded_labels[i, : b.shape[0]] = lab
        padded_difficult[i, : b.shape[0]] = d
    return _PaddedGT(padded_boxes, padded_labels, padded_difficult, width)


def _flatten_detections(det_boxes, det_scores, det_labels, num_classes: int) -> _FlatDetections:
    boxes_list, scores_list, labels_list, image_list = [], [], [], []
    for i in range(len(det_boxes)):
        boxes = _check_boxes(_as_numpy(det_boxes[i], f"det_boxes[{i}]", np.float64), f"det_boxes[{i}]")
        scores = _as_numpy(det_scores[i], f"det_scores[{i}]", np.float64).reshape(-1)
        labels = _as_numpy(det_labels[i], f"det_labels[{i}]", np.int64).reshape(-1)
        if not boxes.shape[0] == scores.shape[0] == labels.shape[0]:
            raise ValueError(
                f"image {i}: det_boxes, det_scores and det_labels must have one entry per detection, "
                f"got {boxes.shape[0]}, {scores.shape[0]}, {labels.shape[0]}"
            )
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"det_scores[{i}]: scores must be finite")
        _check_labels(labels, num_classes, f"det_labels[{i}]")
        boxes_list.append(boxes)
        scores_list.append(scores)
        labels_list.append(labels)
        image_list.append(np.full(labels.shape, i, dtype=np.int64))
    if not boxes_list:
        return _FlatDetections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
    return _FlatDetections(
        np.concatenate(boxes_list), np.concatenate(scores_list), np.concatenate(labels_list), np.concatenate(image_list)
    )


def _best_overlaps(boxes, labels, image, gt: _PaddedGT, box_offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest IoU of each detection with a ground-truth box of its class in its image, and that box's index.

    boxes [D, 4], labels [D], image [D] -> ovmax [D] (-inf when the image has no box of the class), jmax [D].
    ``box_iou`` with ``offset=box_offset`` computes the devkit's overlap (``iw * ih / ua``, widths and heights
    plus the offset) with the same float64 operations in the same order wherever the boxes overlap; where
    they do not, the devkit skips the box and ``box_iou`` gives 0, which is below every threshold in (0, 1]
    as well, so the matches are the devkit's.
    """
    num = boxes.shape[0]
    ovmax = np.full(num, -np.inf)
    jmax = np.zeros(num, dtype=np.int64)
    chunk = max(1, _MAX_PAIRS_PER_CHUNK // gt.width)
    for start in range(0, num, chunk):
        sl = slice(start, min(start + chunk, num))
        det = torch.from_numpy(boxes[sl, None, :])  # [d, 1, 4]
        ref = torch.from_numpy(gt.boxes[image[sl]])  # [d, Gmax, 4]
        iou = box_iou(det, ref, offset=box_offset)[:, 0].numpy()  # [d, Gmax] float64
        iou[gt.labels[image[sl]] != labels[sl, None]] = -np.inf  # other classes and padding
        jmax[sl] = np.argmax(iou, axis=1)  # first maximum, like the devkit's strict ``ov > ovmax``
        ovmax[sl] = np.take_along_axis(iou, jmax[sl, None], axis=1)[:, 0]
    return ovmax, jmax


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
