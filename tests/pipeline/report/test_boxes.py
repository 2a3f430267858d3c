"""pipeline.report.boxes: prior recall per class and COCO size bucket, hand-derived on a one-prior model."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.report.boxes import box_report, boxes_of, write_plots
from pipeline.sources.records import IndexRecord
from ssd_core.priors import PriorSpec

# One 50 x 50 px square prior centred in a 100 px input.
ONE_SQUARE = PriorSpec(100, (1,), (100,), (50,), (50,), ((),))
CLASSES = ["a", "b", "c"]


def _records() -> list[IndexRecord]:
    """A 200 x 100 image, so x is halved on the way to the 100 x 100 input. At the input:
    a: [25, 25, 75, 75] is the prior (IoU 1), 50 x 50 = 2,500 px² -> medium;
    b: [25, 25, 75, 50], 50 x 25 = 1,250 px² -> medium, overlaps half the prior: IoU 1,250 / 2,500 = 0.5;
    b: [0, 0, 25, 25], 625 px² -> small, only touches the prior: IoU 0;
    a: the whole input, 10,000 px² -> large, holds the prior: IoU 2,500 / 10,000 = 0.25;
    c: a difficult box, left out. Class c has no other box."""
    boxes = [[50, 25, 150, 75], [50, 25, 150, 50], [0, 0, 50, 25], [0, 0, 200, 100], [10, 10, 20, 20]]
    return [
        IndexRecord("img", Path("/x.jpg"), 200, 100, boxes, [1, 2, 2, 1, 3], [False, False, False, False, True], False)
    ]


def test_recall_by_class_and_size_is_the_hand_derived_one():
    report = box_report(boxes_of(_records()), CLASSES, ONE_SQUARE, iou_threshold=0.5, min_prior_recall=0.6)
    doc = report.document
    assert (doc["boxes"], doc["difficult_left_out"], doc["prior_recall"]) == (5, 1, 0.5)
    assert doc["mean_best_iou"] == pytest.approx((1 + 0.5 + 0 + 0.25) / 4)
    assert {k: (v["boxes"], v["prior_recall"]) for k, v in doc["per_class"].items()} == {
        "a": (2, 0.5),
        "b": (2, 0.5),
        "c": (0, None),
    }
    assert {k: (v["boxes"], v["prior_recall"]) for k, v in doc["per_size"].items()} == {
        "small": (1, 0.0),
        "medium": (2, 1.0),
        "large": (1, 0.0),
    }
    assert doc["per_class"]["b"]["median_width_px"] == pytest.approx((50 + 25) / 2)
    assert doc["below_min_prior_recall"] == [
        "class a: prior recall 0.500 (2 boxes)",
        "class b: prior recall 0.500 (2 boxes)",
        "size small: prior recall 0.000 (1 boxes)",
        "size large: prior recall 0.000 (1 boxes)",
    ]
    assert len(report.warnings) == 4 and "boxes.min_prior_recall 0.6" in report.warnings[0]
    # at a threshold just above 0.5 the half-covered box no longer counts
    stricter = box_report(boxes_of(_records()), CLASSES, ONE_SQUARE, iou_threshold=0.51, min_prior_recall=0.0)
    assert stricter.document["per_class"]["b"]["prior_recall"] == 0.0 and stricter.warnings == []


def test_the_plots_hold_every_group_and_box(tmp_path):
    report = box_report(boxes_of(_records()), CLASSES, ONE_SQUARE, iou_threshold=0.5, min_prior_recall=0.6)
    written = write_plots(report, CLASSES, tmp_path)
    assert [p.name for p in written] == ["prior_recall.csv", "boxes.csv", "sizes.png"]
    assert (tmp_path / "prior_recall.csv").read_text().splitlines() == [
        "group,prior_recall,boxes",
        "a,0.500000,2",
        "b,0.500000,2",
        "c,,0",
        "size small,0.000000,1",
        "size medium,1.000000,2",
        "size large,0.000000,1",
    ]
    rows = (tmp_path / "boxes.csv").read_text().splitlines()
    assert rows[0] == "class,width_px,height_px,best_iou" and rows[1] == "a,50.00,50.00,1.0000" and len(rows) == 5
    assert (tmp_path / "sizes.png").read_bytes()[:4] == b"\x89PNG"
