"""ssd_core.metrics: hand-computed AP cases, devkit matching rules, and a slow port of VOCevaldet.m."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd_core.metrics import evaluate_voc, voc_ap


# ------------------------------------------------------------------------------- slow reference
def devkit_voc_eval(dets, gts, cls, *, iou_threshold=0.5, box_offset=0.0):
    """A line-by-line Python port of the VOC devkit's VOCevaldet.m for one class.

    dets: per image (boxes [K,4], scores [K], labels [K]); gts: per image (boxes [G,4], labels [G], difficult [G]).
    Returns (ap07, ap, rec, prec, counted): rec/prec over every detection (ignored ones included, as the
    devkit keeps them), ``counted`` marking the detections that are not ignored.
    The only change from the devkit: the 11 recall levels are k/10 (see ssd_core.metrics).
    """
    gt, npos = [], 0
    for boxes, labels, difficult in gts:
        sel = [j for j in range(len(labels)) if labels[j] == cls]
        gt.append({"BB": [boxes[j] for j in sel], "diff": [bool(difficult[j]) for j in sel], "det": [False] * len(sel)})
        npos += sum(1 for j in sel if not difficult[j])
    ids, confidence, bbs = [], [], []
    for i, (boxes, scores, labels) in enumerate(dets):
        for k in range(len(scores)):
            if labels[k] == cls:
                ids.append(i)
                confidence.append(float(scores[k]))
                bbs.append(boxes[k])
    order = sorted(range(len(confidence)), key=lambda k: -confidence[k])  # MATLAB sort: stable
    nd = len(order)
    tp, fp, counted = [0.0] * nd, [0.0] * nd, [True] * nd
    for d, k in enumerate(order):
        i, bb = ids[k], bbs[k]
        ovmax, jmax = -math.inf, -1
        for j, bbgt in enumerate(gt[i]["BB"]):
            bi = [max(bb[0], bbgt[0]), max(bb[1], bbgt[1]), min(bb[2], bbgt[2]), min(bb[3], bbgt[3])]
            iw = bi[2] - bi[0] + box_offset
            ih = bi[3] - bi[1] + box_offset
            if iw > 0 and ih > 0:
                ua = (
                    (bb[2] - bb[0] + box_offset) * (bb[3] - bb[1] + box_offset)
                    + (bbgt[2] - bbgt[0] + box_offset) * (bbgt[3] - bbgt[1] + box_offset)
                    - iw * ih
                )
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= iou_threshold:
            if not gt[i]["diff"][jmax]:
                if not gt[i]["det"][jmax]:
                    tp[d] = 1.0
                    gt[i]["det"][jmax] = True
                else:
                    fp[d] = 1.0
            else:
                counted[d] = False
        else:
            fp[d] = 1.0
    ctp, cfp, rec, prec = 0.0, 0.0, [], []
    for d in range(nd):
        ctp += tp[d]
        cfp += fp[d]
        rec.append(ctp / npos if npos else math.nan)
        prec.append(ctp / max(ctp + cfp, np.finfo(np.float64).eps))
    if npos == 0:
        return math.nan, math.nan, rec, prec, counted
    ap07 = 0.0
    for t in [k / 10 for k in range(11)]:
        ps = [p for r, p in zip(rec, prec, strict=True) if r >= t]
        ap07 += (max(ps) if ps else 0.0) / 11
    mrec = [0.0] + rec + [1.0]
    mpre = [0.0] + prec + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap = sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])
    return ap07, ap, rec, prec, counted


def random_case(rng: np.random.Generator, num_images: int, num_classes: int, grid: int = 30):
    """Boxes on a coarse integer grid (so exact IoU ties and IoU == 0.5 happen), quantised scores (ties)."""

    def boxes(n):
        xy = rng.integers(0, grid - 1, size=(n, 2))
        wh = rng.integers(2, grid // 2, size=(n, 2))
        return np.concatenate([xy, np.minimum(xy + wh, grid)], axis=1).astype(np.float64)

    gts, dets = [], []
    for _ in range(num_images):
        g = int(rng.integers(0, 6))
        gt_boxes = boxes(g)
        gt_labels = rng.integers(1, num_classes, size=g)
        difficult = rng.random(g) < 0.25
        gts.append((gt_boxes, gt_labels, difficult))
        # detections: jittered copies of ground truth (likely hits, some duplicates) plus random boxes
        k_copies = int(rng.integers(0, 2 * g + 1)) if g else 0
        src = rng.integers(0, max(g, 1), size=k_copies)
        copies = gt_boxes[src] + rng.integers(-1, 2, size=(k_copies, 4)) if g else np.zeros((0, 4))
        copies[:, 2:] = np.maximum(copies[:, 2:], copies[:, :2] + 1)
        copy_labels = np.where(rng.random(k_copies) < 0.8, gt_labels[src] if g else 1, rng.integers(1, num_classes))
        k_rand = int(rng.integers(0, 5))
        det_boxes = np.concatenate([copies, boxes(k_rand)])
        det_labels = np.concatenate([copy_labels, rng.integers(1, num_classes, size=k_rand)]).astype(np.int64)
        det_scores = np.round(rng.random(len(det_labels)), 1)  # ties on purpose
        dets.append((det_boxes, det_scores, det_labels))
    return dets, gts


def run_ours(dets, gts, num_classes, **kwargs):
    return evaluate_voc(
        [d[0] for d in dets],
        [d[1] for d in dets],
        [d[2] for d in dets],
        [g[0] for g in gts],
        [g[1] for g in gts],
        [g[2] for g in gts],
        num_classes=num_classes,
        **kwargs,
    )


# ------------------------------------------------------------------------------- reference agreement
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("box_offset", [0.0, 1.0])
def test_matches_devkit_port_on_random_detections_with_difficult_boxes(seed, box_offset):
    rng = np.random.default_rng(seed)
    num_classes = 4
    dets, gts = random_case(rng, num_images=int(rng.integers(1, 25)), num_classes=num_classes)
    ours = run_ours(dets, gts, num_classes, box_offset=box_offset)
    for c in range(1, num_classes):
        ap07, ap, rec, prec, counted = devkit_voc_eval(dets, gts, c, box_offset=box_offset)
        np.testing.assert_allclose(ours.ap_voc07[c - 1], ap07, rtol=0, atol=1e-12, equal_nan=True)
        np.testing.assert_allclose(ours.ap_voc[c - 1], ap, rtol=0, atol=1e-12, equal_nan=True)
        keep = np.asarray(counted, dtype=bool)
        np.testing.assert_allclose(ours.curves[c - 1].precision, np.asarray(prec)[keep], rtol=0, atol=1e-12)
        np.testing.assert_allclose(ours.curves[c - 1].recall, np.asarray(rec)[keep], rtol=0, atol=1e-12)
    expected_npos = [sum(int(((g[1] == c) & ~g[2]).sum()) for g in gts) for c in range(1, num_classes)]
    assert ours.num_positives.tolist() == expected_npos


def test_chunked_overlap_computation_matches_unchunked(monkeypatch):
    import ssd_core.metrics as metrics

    rng = np.random.default_rng(7)
    dets, gts = random_case(rng, num_images=30, num_classes=5)
    whole = run_ours(dets, gts, 5)
    monkeypatch.setattr(metrics, "_MAX_PAIRS_PER_CHUNK", 7)  # a handful of detections per block
    chunked = run_ours(dets, gts, 5)
    np.testing.assert_array_equal(whole.ap_voc07, chunked.ap_voc07)
    np.testing.assert_array_equal(whole.ap_voc, chunked.ap_voc)


# ------------------------------------------------------------------------------- hand-computed AP
def test_voc_ap_hand_computed_three_detections():
    # npos = 4; detections in score order: TP, FP, TP.
    # rec = [1/4, 1/4, 2/4], prec = [1, 1/2, 2/3].
    # 11-point: t = 0, .1, .2 -> max prec over all points = 1; t = .3, .4, .5 -> only the last point
    #   (rec .5) qualifies -> 2/3; t >= .6 -> no point -> 0.  AP07 = (3 * 1 + 3 * 2/3) / 11 = 5/11.
    # area: mrec = [0, .25, .25, .5, 1], envelope of [0, 1, .5, 2/3, 0] = [1, 1, 2/3, 2/3, 0];
    #   recall steps 0->.25 (prec 1), .25->.5 (2/3), .5->1 (0): AP = .25 + .25 * 2/3 = 5/12.
    rec = np.array([0.25, 0.25, 0.5])
    prec = np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(5 / 11, abs=1e-15)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(5 / 12, abs=1e-15)


def test_voc_ap_recall_exactly_three_tenths_reaches_the_0_3_level():
    # npos = 10, three true positives: rec = [.1, .2, .3], prec = 1.  Levels 0, .1, .2, .3 are reached:
    # AP07 = 4/11 (np.arange(0, 1.1, 0.1) would make the fourth level 0.30000000000000004 and give 3/11).
    # Area: 0.3 * 1 = 0.3.
    rec = np.array([1, 2, 3]) / 10
    prec = np.ones(3)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(4 / 11, abs=1e-15)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.3, abs=1e-15)


def test_voc_ap_empty_and_invalid_curves():
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric=True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), use_07_metric=False) == 0.0
    with pytest.raises(ValueError, match="non-decreasing"):
        voc_ap(np.array([0.5, 0.25]), np.array([1.0, 1.0]), use_07_metric=True)
    with pytest.raises(ValueError, match="same length"):
        voc_ap(np.array([0.5]), np.array([1.0, 1.0]), use_07_metric=False)


def _one_image(gt_boxes, gt_labels, difficult, det_boxes, det_scores, det_labels, num_classes=2):
    return evaluate_voc(
        [np.array(det_boxes, dtype=float).reshape(-1, 4)],
        [np.array(det_scores, dtype=float)],
        [np.array(det_labels)],
        [np.array(gt_boxes, dtype=float).reshape(-1, 4)],
        [np.array(gt_labels)],
        [np.array(difficult, dtype=bool)],
        num_classes=num_classes,
    )


def test_detections_on_a_difficult_box_are_ignored_even_repeatedly():
    # GT: A = [0,0,10,10] difficult, B = [20,20,30,30]; npos = 1 (only B).
    # .9 on A -> ignored; .8 on B -> TP; .7 on B -> FP (duplicate); .6 on A -> ignored again.
    # Counted: TP, FP -> rec [1, 1], prec [1, .5] -> AP07 = 1 (every level reaches prec 1), area = 1.
    a, b = [0, 0, 10, 10], [20, 20, 30, 30]
    result = _one_image([a, b], [1, 1], [True, False], [a, b, b, a], [0.9, 0.8, 0.7, 0.6], [1, 1, 1, 1])
    assert result.num_positives.tolist() == [1]
    np.testing.assert_allclose(result.curves[0].recall, [1.0, 1.0])
    np.testing.assert_allclose(result.curves[0].precision, [1.0, 0.5])
    np.testing.assert_allclose(result.curves[0].scores, [0.8, 0.7])
    assert result.map_voc07 == pytest.approx(1.0)
    assert result.map_voc == pytest.approx(1.0)


def test_best_overlap_with_a_difficult_box_wins_over_a_normal_box():
    # Detection [0,0,10,10]; difficult GT identical (IoU 1); normal GT [0,0,10,6] (IoU 60/100 = .6 >= .5).
    # The devkit takes the highest-IoU box, the difficult one, and ignores the detection: B stays unmatched,
    # npos = 1, no counted detection -> AP 0 (empty curve).
    result = _one_image([[0, 0, 10, 10], [0, 0, 10, 6]], [1, 1], [True, False], [[0, 0, 10, 10]], [0.9], [1])
    assert result.curves[0].recall.size == 0
    assert result.map_voc07 == 0.0 and result.map_voc == 0.0


def test_duplicate_on_a_matched_box_is_a_false_positive_without_falling_back():
    # GT A = [0,0,10,10], B = [0,0,10,8] (IoU(A, B) = 80/100). Two detections equal to A:
    # first -> A (IoU 1) TP; second -> best is A again (already matched) -> FP, although its IoU with B is .8.
    # rec = [1/2, 1/2], prec = [1, 1/2]. AP07: t <= .5 -> 1 (6 levels), t > .5 -> 0: 6/11. Area: .5 * 1 = .5.
    a = [0, 0, 10, 10]
    result = _one_image([a, [0, 0, 10, 8]], [1, 1], [False, False], [a, a], [0.9, 0.8], [1, 1])
    assert result.map_voc07 == pytest.approx(6 / 11, abs=1e-15)
    assert result.map_voc == pytest.approx(0.5, abs=1e-15)


def test_iou_exactly_at_threshold_matches():
    # GT [0,0,10,10]; detection [0,0,10,5]: IoU = 50 / 100 = 0.5 exactly -> TP under the devkit's ">=".
    result = _one_image([[0, 0, 10, 10]], [1], [False], [[0, 0, 10, 5]], [0.9], [1])
    assert result.map_voc == 1.0


@pytest.mark.parametrize(("threshold", "height"), [(0.5, 5.0), (0.75, 7.5), (0.25, 2.5)])
def test_iou_exactly_at_any_threshold_matches_and_just_below_it_does_not(threshold, height):
    # GT [0,0,10,10]; detection [0,0,10,h]: IoU = 10 h / 100 = threshold exactly (dyadic quotients). The
    # devkit (VOCevaldet.m) counts a match when ``ovmax >= VOCopts.minoverlap``.
    at = evaluate_voc(
        [np.array([[0, 0, 10, height]])],
        [np.array([0.9])],
        [np.array([1])],
        [np.array([[0.0, 0, 10, 10]])],
        [np.array([1])],
        num_classes=2,
        iou_threshold=threshold,
    )
    assert at.curves[0].tp.tolist() == [True] and at.map_voc == 1.0
    above = np.nextafter(threshold, 1.0)
    miss = evaluate_voc(
        [np.array([[0, 0, 10, height]])],
        [np.array([0.9])],
        [np.array([1])],
        [np.array([[0.0, 0, 10, 10]])],
        [np.array([1])],
        num_classes=2,
        iou_threshold=above,
    )
    assert miss.curves[0].tp.tolist() == [False] and miss.map_voc == 0.0


def test_iou_exactly_at_threshold_with_a_difficult_box_is_ignored():
    # The same exact 0.5 with a difficult box: the detection hits it, so it is ignored (neither TP nor FP).
    result = _one_image([[0, 0, 10, 10]], [1], [True], [[0, 0, 10, 5]], [0.9], [1])
    assert result.curves[0].scores.size == 0 and result.num_positives.tolist() == [0]


def test_devkit_pixel_offset_changes_the_overlap():
    # GT [0,0,9,9], detection [0,0,9,4] inside it.
    # offset 1 (inclusive pixels): 10x10 vs 10x5 -> IoU 50/100 = .5 -> TP -> AP 1.
    # offset 0 (continuous): 9x9 vs 9x4 -> IoU 36/81 = .444 -> FP -> AP 0.
    args = (
        [np.array([[0, 0, 9, 4]], float)],
        [np.array([0.9])],
        [np.array([1])],
        [np.array([[0, 0, 9, 9]], float)],
        [np.array([1])],
        None,
    )
    assert evaluate_voc(*args, num_classes=2, box_offset=1.0).map_voc == 1.0
    assert evaluate_voc(*args, num_classes=2, box_offset=0.0).map_voc == 0.0


# ------------------------------------------------------------------------------- edge cases
def test_class_without_ground_truth_is_nan_and_left_out_of_the_mean():
    # Class 1: one perfect detection (AP 1). Class 2: only a difficult box -> npos 0 -> NaN, not in the mean.
    result = _one_image([[0, 0, 5, 5], [5, 5, 9, 9]], [1, 2], [False, True], [[0, 0, 5, 5]], [0.5], [1], num_classes=3)
    assert result.ap_voc.tolist()[0] == 1.0 and math.isnan(result.ap_voc[1])
    assert result.map_voc == 1.0 and result.map_voc07 == 1.0


def test_no_detections_and_no_images():
    result = _one_image([[0, 0, 5, 5]], [1], [False], [], [], [])
    assert result.map_voc07 == 0.0 and result.map_voc == 0.0
    empty = evaluate_voc([], [], [], [], [], [], num_classes=3)
    assert math.isnan(empty.map_voc) and math.isnan(empty.map_voc07)
    assert empty.num_positives.tolist() == [0, 0]


def test_all_difficult_gives_nan():
    result = _one_image([[0, 0, 5, 5]], [1], [True], [[0, 0, 5, 5]], [0.5], [1])
    assert math.isnan(result.map_voc) and result.curves[0].recall.size == 0


def test_accepts_torch_tensors():
    result = evaluate_voc(
        [torch.tensor([[0.0, 0.0, 0.5, 0.5]])],
        [torch.tensor([0.7])],
        [torch.tensor([1])],
        [torch.tensor([[0.0, 0.0, 0.5, 0.5]])],
        [torch.tensor([1])],
        [torch.tensor([False])],
        num_classes=2,
    )
    assert result.map_voc == 1.0


def test_bad_inputs_raise_with_the_place():
    ok_boxes = [np.zeros((1, 4))]
    with pytest.raises(ValueError, match="one entry per image"):
        evaluate_voc(ok_boxes, [np.ones(1)], [np.ones(1, int)], [], [], None, num_classes=2)
    with pytest.raises(ValueError, match=r"det_labels\[0\]: labels must be in 1..1"):
        evaluate_voc(ok_boxes, [np.ones(1)], [np.array([2])], ok_boxes, [np.array([1])], None, num_classes=2)
    with pytest.raises(ValueError, match=r"gt_boxes\[0\]: expected boxes of shape"):
        evaluate_voc(
            ok_boxes, [np.ones(1)], [np.ones(1, int)], [np.zeros((1, 3))], [np.array([1])], None, num_classes=2
        )
    with pytest.raises(ValueError, match="image 0: det_boxes, det_scores"):
        evaluate_voc(ok_boxes, [np.ones(2)], [np.ones(1, int)], ok_boxes, [np.array([1])], None, num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_voc([], [], [], [], [], None, num_classes=1)


# ------------------------------------------------------------------------------- properties
boxes_strategy = st.lists(
    st.tuples(
        st.integers(0, 50), st.integers(0, 50), st.integers(1, 30), st.integers(1, 30), st.integers(1, 3), st.booleans()
    ),
    min_size=0,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(boxes_strategy, min_size=1, max_size=5))
def test_detecting_every_box_exactly_gives_ap_one(images):
    # Every ground-truth box detected once with a distinct score: all TPs (difficult ones ignored), no FP.
    # (Two identical boxes of one class in one image are excluded: the devkit gives both detections to the
    # first box, so the second is a duplicate FP.)
    gts, dets, score = [], [], 1.0
    for objs in images:
        objs = list({(x, y, w, h, c): (x, y, w, h, c, d) for x, y, w, h, c, d in objs}.values())
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h, _, _ in objs], dtype=float).reshape(-1, 4)
        labels = np.array([c for *_, c, _ in objs], dtype=np.int64)
        difficult = np.array([d for *_, d in objs], dtype=bool)
        scores = score - np.arange(len(objs)) * 1e-3
        score -= 0.01
        gts.append((boxes, labels, difficult))
        dets.append((boxes, scores, labels))
    result = run_ours(dets, gts, 4)
    for c in range(3):
        if result.num_positives[c] > 0:
            assert result.ap_voc07[c] == pytest.approx(1.0) and result.ap_voc[c] == pytest.approx(1.0)
        else:
            assert math.isnan(result.ap_voc[c])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_image_order_does_not_change_ap_when_scores_are_distinct(seed):
    rng = np.random.default_rng(seed)
    dets, gts = random_case(rng, num_images=8, num_classes=3)
    dets = [(b, s + rng.random(len(s)) * 1e-6, lab) for b, s, lab in dets]  # break ties
    perm = rng.permutation(len(gts))
    a = run_ours(dets, gts, 3)
    b = run_ours([dets[i] for i in perm], [gts[i] for i in perm], 3)
    np.testing.assert_allclose(a.ap_voc, b.ap_voc, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(a.ap_voc07, b.ap_voc07, atol=1e-12, equal_nan=True)
