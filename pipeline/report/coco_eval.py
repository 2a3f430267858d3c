"""COCO-format ground truth / detections, and COCO box mAP through faster-coco-eval or pycocotools.

The COCO protocol (IoU 0.5:0.95, 101 recall points, area ranges, maxDets 100) is never re-implemented
here: both backends are the reference tools, and the test suite checks one against the other.

Conventions of the JSON written here (so any COCO tool can re-score it):

* image ``id`` is 1..N in evaluation order, ``file_name`` is the sample key, ``width``/``height`` are the
  original pixel size;
* category ``id`` is the detector label (1..C-1), ``name`` the class name;
* ``bbox`` is ``[x, y, w, h]`` in original-image pixels, rounded to 1/100 pixel; ``area`` is ``w * h``
  (there are no masks), which decides the small/medium/large split;
* a VOC "difficult" box becomes ``iscrowd: 1`` — COCO's only way to say "do not count, do not penalise":
  a detection that matches it is ignored rather than a false positive (with COCO's crowd IoU,
  intersection over the detection's area), and it adds nothing to the positives;
* detection scores are rounded to 1e-5. The metrics are computed on exactly the records that are written.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

BACKENDS = ("faster_coco_eval", "pycocotools")
_BOX_DECIMALS = 2
_SCORE_DECIMALS = 5
STAT_NAMES = (
    "map",
    "ap50",
    "ap75",
    "ap_small",
    "ap_medium",
    "ap_large",
    "ar1",
    "ar10",
    "ar100",
    "ar_small",
    "ar_medium",
    "ar_large",
)  # fmt: skip  -- the order of COCOeval.stats


class CocoMetrics(NamedTuple):
    """COCO box metrics (NaN where COCO reports -1, i.e. no ground truth in that group).

    map: AP@[.5:.95] (all areas, 100 detections per image); ap50 / ap75: AP at IoU .5 / .75;
    ap_small / ap_medium / ap_large: AP@[.5:.95] by object area (< 32², < 96², larger);
    ar1 / ar10 / ar100 and ar_small / ar_medium / ar_large: average recall;
    per_class_ap: {category id: AP@[.5:.95]} (NaN for a category without ground truth);
    summary: the standard 12-line COCOeval summary table.
    """

    map: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    ar1: float
    ar10: float
    ar100: float
    ar_small: float
    ar_medium: float
    ar_large: float
    per_class_ap: dict[int, float]
    summary: str

    def as_dict(self) -> dict[str, float]:
        """The 12 summary statistics by name."""
        return {name: float(getattr(self, name)) for name in STAT_NAMES}


def _to_numpy(value: Any, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _xywh(boxes_xyxy: np.ndarray) -> np.ndarray:
    boxes = boxes_xyxy.reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return np.round(xywh, _BOX_DECIMALS)


def coco_ground_truth(
    keys: Sequence[str],
    sizes: Any,
    boxes: Sequence[Any],
    labels: Sequence[Any],
    difficult: Sequence[Any] | None,
    classes: Sequence[str],
) -> dict[str, Any]:
    """A COCO instances dataset (dict, JSON-ready) of the validation ground truth.

    Args:
        keys: N sample keys (``file_name``).
        sizes: [N, 2] (width, height) original pixels.
        boxes: per image [G, 4] xyxy in original pixels.
        labels: per image [G] labels in 1..len(classes).
        difficult: per image [G] bool (written as ``iscrowd``), or None.
        classes: class names without background; label i + 1 is ``classes[i]``.
    """
    sizes_np = _to_numpy(sizes, np.int64).reshape(-1, 2)
    n = len(keys)
    if not (sizes_np.shape[0] == len(boxes) == len(labels) == n) or (difficult is not None and len(difficult) != n):
        raise ValueError(
            f"coco_ground_truth: expected one entry per image (keys: {n}), got sizes {sizes_np.shape[0]}, "
            f"boxes {len(boxes)}, labels {len(labels)}, difficult {None if difficult is None else len(difficult)}"
        )
    images, annotations = [], []
    for i in range(n):
        width, height = (int(v) for v in sizes_np[i])
        images.append({"id": i + 1, "file_name": str(keys[i]), "width": width, "height": height})
        xywh = _xywh(_to_numpy(boxes[i], np.float64))
        lab = _to_numpy(labels[i], np.int64).reshape(-1)
        crowd = np.zeros(len(lab), bool) if difficult is None else _to_numpy(difficult[i], bool).reshape(-1)
        if not xywh.shape[0] == lab.shape[0] == crowd.shape[0]:
            raise ValueError(f"coco_ground_truth: image {i} ({keys[i]}): boxes, labels and difficult differ in length")
        if lab.size and (lab.min() < 1 or lab.max() > len(classes)):
            raise ValueError(f"coco_ground_truth: image {i} ({keys[i]}): labels must be in 1..{len(classes)}")
        for box, label, is_crowd in zip(xywh.tolist(), lab.tolist(), crowd.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": label,
                    "bbox": box,
                    "area": round(box[2] * box[3], _BOX_DECIMALS * 2),
                    "iscrowd": int(is_crowd),
                }
            )
    categories = [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(classes)]
    return {
        "info": {"description": "validation ground truth written by `python -m pipeline evaluate`"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def coco_detections(boxes: Sequence[Any], scores: Sequence[Any], labels: Sequence[Any]) -> list[dict[str, Any]]:
    """COCO results list for images 1..N: per image [K, 4] xyxy pixels, [K] scores, [K] labels."""
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(
            f"coco_detections: expected one entry per image, got {len(boxes)} boxes, {len(scores)} scores, "
            f"{len(labels)} labels"
        )
    results = []
    for i in range(len(boxes)):
        xywh = _xywh(_to_numpy(boxes[i], np.float64)).tolist()
        sc = np.round(_to_numpy(scores[i], np.float64).reshape(-1), _SCORE_DECIMALS).tolist()
        lab = _to_numpy(labels[i], np.int64).reshape(-1).tolist()
        if not len(xywh) == len(sc) == len(lab):
            raise ValueError(f"coco_detections: image {i}: boxes, scores and labels differ in length")
        results.extend(
            {"image_id": i + 1, "category_id": c, "bbox": b, "score": s} for b, s, c in zip(xywh, sc, lab, strict=True)
        )
    return results


def coco_evaluate(
    ground_truth: dict[str, Any], detections: list[dict[str, Any]], *, backend: str = "faster_coco_eval"
) -> CocoMetrics:
    """COCO box metrics of ``detections`` against ``ground_truth`` with the chosen reference tool.

    The inputs are not modified (both tools annotate what they are given; they get copies).
    """
    if backend not in BACKENDS:
        raise ValueError(f"coco_evaluate: backend must be one of {BACKENDS}, got {backend!r}")
    if not ground_truth.get("images"):
        raise ValueError("coco_evaluate: the ground truth has no images")
    gt = {
        key: _copy_records(value) if isinstance(value, list) else copy.deepcopy(value)
        for key, value in ground_truth.items()
    }
    dets = _copy_records(detections)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):  # pycocotools prints progress; keep stdout clean
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCO, COCOeval_faster

            coco_gt = COCO(gt, print_function=logger.debug)
            coco_dt = coco_gt.loadRes(dets)
            evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=print)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            coco_gt = COCO()
            coco_gt.dataset = gt
            coco_gt.createIndex()
            if dets:
                coco_dt = coco_gt.loadRes(dets)
            else:  # pycocotools' loadRes cannot take an empty list
                coco_dt = COCO()
                coco_dt.dataset = {"images": list(gt["images"]), "annotations": [], "categories": gt["categories"]}
                coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    summary = "\n".join([line for line in captured.getvalue().splitlines() if "Average" in line][: len(STAT_NAMES)])
    stats = [float(s) for s in np.asarray(evaluator.stats, dtype=np.float64)[: len(STAT_NAMES)]]
    stats = [float("nan") if s < 0 else s for s in stats]
    per_class = _per_class_ap(evaluator)
    return CocoMetrics(*stats, per_class_ap=per_class, summary=summary)


def _copy_records(records: list[Any]) -> list[Any]:
    """Copies the tools may annotate (they add keys such as ``area``, ``id``, ``ignore``); much cheaper
    than ``deepcopy`` on a million detections. Box lists are copied too."""
    return [{**r, "bbox": list(r["bbox"])} if isinstance(r, dict) and "bbox" in r else copy.copy(r) for r in records]


def _per_class_ap(evaluator) -> dict[int, float]:
    """AP@[.5:.95] per category: mean of precision[T, R, k, area=all, maxDets=100] over valid entries."""
    precision = np.asarray(evaluator.eval["precision"], dtype=np.float64)  # [T, R, K, A, M]
    cat_ids = list(evaluator.params.catIds)
    area = list(evaluator.params.areaRngLbl).index("all")
    max_det = len(evaluator.params.maxDets) - 1  # 100
    result = {}
    for k, cat in enumerate(cat_ids):
        p = precision[:, :, k, area, max_det]
        valid = p[p > -1]
        result[int(cat)] = float(valid.mean()) if valid.size else float("nan")
    return result
