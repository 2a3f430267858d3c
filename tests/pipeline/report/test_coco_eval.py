"""pipeline.report.coco_eval: COCO JSON building, and the faster-coco-eval path against pycocotools' COCOeval."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.report.coco_eval import BACKENDS, STAT_NAMES, coco_detections, coco_evaluate, coco_ground_truth

CLASSES = ["cat", "dog", "bird"]


def generated_set(seed: int, num_images: int = 60):
    """Ground truth with small, medium and large boxes and some difficult ones; detections that are
    jittered copies (varied IoU), duplicates, wrong labels and random boxes, with random scores."""
    rng = np.random.default_rng(seed)
    keys, sizes, gt_boxes, gt_labels, difficult = [], [], [], [], []
    det_boxes, det_scores, det_labels = [], [], []
    for i in range(num_images):
        w, h = int(rng.integers(120, 640)), int(rng.integers(120, 480))
        g = int(rng.integers(0, 7))
        side = rng.choice([12.0, 50.0, 150.0], size=g) * rng.uniform(0.6, 1.4, size=g)  # small / medium / large
        x1 = rng.uniform(0, w * 0.7, size=g)
        y1 = rng.uniform(0, h * 0.7, size=g)
        boxes = np.stack([x1, y1, np.minimum(x1 + side, w), np.minimum(y1 + side * rng.uniform(0.5, 1.5, g), h)], 1)
        labels = rng.integers(1, len(CLASSES) + 1, size=g)
        keys.append(f"img_{i:04d}")
        sizes.append((w, h))
        gt_boxes.append(boxes.reshape(-1, 4))
        gt_labels.append(labels)
        difficult.append(rng.random(g) < 0.15)
        src = rng.integers(0, max(g, 1), size=int(rng.integers(0, 2 * g + 1)) if g else 0)
        jitter = rng.normal(0, 0.08, size=(len(src), 4)) * np.repeat(side[src, None], 4, 1) if g else np.zeros((0, 4))
        copies = boxes[src] + jitter if g else np.zeros((0, 4))
        copy_labels = np.where(rng.random(len(src)) < 0.85, labels[src] if g else 1, rng.integers(1, 4, len(src)))
        k = int(rng.integers(0, 4))
        rx, ry = rng.uniform(0, w - 10, k), rng.uniform(0, h - 10, k)
        rand = np.stack([rx, ry, rx + rng.uniform(5, 200, k), ry + rng.uniform(5, 200, k)], 1)
        det_boxes.append(np.concatenate([copies, rand]).reshape(-1, 4))
        det_labels.append(np.concatenate([copy_labels, rng.integers(1, 4, k)]).astype(np.int64))
        det_scores.append(rng.random(len(det_labels[-1])))
    gt = coco_ground_truth(keys, np.array(sizes), gt_boxes, gt_labels, difficult, CLASSES)
    return gt, coco_detections(det_boxes, det_scores, det_labels)


def pycocotools_reference(gt_path, det_path):
    """COCOeval exactly as its README runs it, from the JSON files."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(str(det_path))
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_metrics_equal_pycocotools_cocoeval_from_the_written_json(tmp_path, seed, backend):
    gt, dets = generated_set(seed)
    assert any(a["iscrowd"] for a in gt["annotations"]) and dets
    gt_path, det_path = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_path.write_text(json.dumps(gt))
    det_path.write_text(json.dumps(dets))
    reference = pycocotools_reference(gt_path, det_path)
    ours = coco_evaluate(json.loads(gt_path.read_text()), json.loads(det_path.read_text()), backend=backend)
    for name, ref in zip(STAT_NAMES, reference.stats, strict=True):
        value = getattr(ours, name)
        if ref < 0:
            assert math.isnan(value), name
        else:
            assert value == pytest.approx(ref, abs=1e-6), name
    precision = reference.eval["precision"][:, :, :, 0, -1]  # [T, R, K] area all, maxDets 100
    for k, cat in enumerate(reference.params.catIds):
        p = precision[:, :, k]
        expected = p[p > -1].mean() if (p > -1).any() else math.nan
        np.testing.assert_allclose(ours.per_class_ap[cat], expected, atol=1e-6, equal_nan=True)
    assert 0.0 < ours.map < 1.0  # the generated set exercises the protocol, it is not trivially 0 or 1


def test_hand_computed_single_box():
    # GT [0,0,100,100] (area 10000 > 96² = 9216: "large"); detection [0,0,100,62]: IoU = 6200/10000 = .62.
    # It matches at IoU thresholds .50, .55, .60 and misses at .65 ... .95: AP@[.5:.95] = 3/10,
    # AP50 = 1, AP75 = 0, AP_large = .3; no small or medium ground truth -> NaN (COCO's -1).
    gt = coco_ground_truth(["a"], [[200, 200]], [np.array([[0.0, 0, 100, 100]])], [np.array([1])], None, ["x"])
    dets = coco_detections([np.array([[0.0, 0, 100, 62]])], [np.array([0.9])], [np.array([1])])
    for backend in BACKENDS:
        m = coco_evaluate(gt, dets, backend=backend)
        assert m.map == pytest.approx(0.3, abs=1e-12)
        assert (m.ap50, m.ap75, m.ap_large) == pytest.approx((1.0, 0.0, 0.3), abs=1e-12)
        assert math.isnan(m.ap_small) and math.isnan(m.ap_medium)
        assert m.per_class_ap == {1: pytest.approx(0.3, abs=1e-12)}
        assert m.summary.count("Average") == len(STAT_NAMES)


def test_difficult_box_is_a_crowd_region_and_a_detection_on_it_is_not_a_false_positive():
    # A: normal box, B: difficult. Detection on B (score .9) is ignored; detection on A (.8) is a TP:
    # AP50 = 1. (Were B dropped, the .9 detection would be an FP ranked first: AP50 would be 1/2 at most.)
    a, b = [10.0, 10, 60, 60], [100.0, 100, 150, 150]
    gt = coco_ground_truth(
        ["a"], [[200, 200]], [np.array([a, b])], [np.array([1, 1])], [np.array([False, True])], ["x"]
    )
    assert [ann["iscrowd"] for ann in gt["annotations"]] == [0, 1]
    dets = coco_detections([np.array([b, a])], [np.array([0.9, 0.8])], [np.array([1, 1])])
    for backend in BACKENDS:
        assert coco_evaluate(gt, dets, backend=backend).ap50 == pytest.approx(1.0)


def test_json_layout():
    gt = coco_ground_truth(
        ["k1", "k2"],
        np.array([[64, 48], [32, 32]]),
        [np.array([[1.0, 2.0, 11.256, 22.0]]), np.zeros((0, 4))],
        [np.array([2]), np.array([], int)],
        None,
        ["a", "b"],
    )
    assert gt["images"] == [
        {"id": 1, "file_name": "k1", "width": 64, "height": 48},
        {"id": 2, "file_name": "k2", "width": 32, "height": 32},
    ]
    # xyxy [1, 2, 11.256, 22] -> xywh [1, 2, 10.256 -> 10.26, 20]; area 10.26 * 20 = 205.2
    assert gt["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1.0, 2.0, 10.26, 20.0], "area": 205.2, "iscrowd": 0}
    ]
    assert gt["categories"][1] == {"id": 2, "name": "b", "supercategory": "object"}
    dets = coco_detections(
        [np.zeros((0, 4)), np.array([[0.0, 0, 4, 4]])],
        [np.zeros(0), np.array([0.123456789])],
        [np.zeros(0, int), np.array([1])],
    )
    assert dets == [{"image_id": 2, "category_id": 1, "bbox": [0.0, 0.0, 4.0, 4.0], "score": 0.12346}]
    json.dumps(gt), json.dumps(dets)  # JSON-ready: no NumPy scalars
    assert all(type(v) is float for v in dets[0]["bbox"]) and type(gt["annotations"][0]["category_id"]) is int


def test_no_detections_gives_zero_not_an_error():
    gt, _ = generated_set(5, num_images=10)
    for backend in BACKENDS:
        m = coco_evaluate(gt, [], backend=backend)
        assert m.map == 0.0 and m.ap50 == 0.0


def test_inputs_are_not_modified_and_bad_inputs_raise():
    gt, dets = generated_set(3, num_images=8)
    before = (json.dumps(gt), json.dumps(dets))
    coco_evaluate(gt, dets, backend="pycocotools")
    coco_evaluate(gt, dets)
    assert (json.dumps(gt), json.dumps(dets)) == before
    with pytest.raises(ValueError, match="backend must be one of"):
        coco_evaluate(gt, dets, backend="mine")
    with pytest.raises(ValueError, match="labels must be in 1..2"):
        coco_ground_truth(["a"], [[10, 10]], [np.zeros((1, 4))], [np.array([3])], None, ["a", "b"])
    with pytest.raises(ValueError, match="one entry per image"):
        coco_ground_truth(["a", "b"], [[10, 10]], [np.zeros((1, 4))], [np.array([1])], None, ["a"])
