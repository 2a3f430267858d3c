"""Scoring: detections equal to the ground truth score 1 everywhere, detections beside it score 0."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.report.scoring import SUMMARY_KEYS, Collected, score_detections
from pipeline.shards.eval_loader import eval_loader


@pytest.fixture(scope="module")
def classes(uneven_shards):
    return json.loads((uneven_shards / "manifest.json").read_text())["classes"]


def _collected_from_ground_truth(shards, jitter: float = 0.0, seed: int = 0) -> Collected:
    """Detections = the ground truth itself (optionally shifted), one per box, distinct scores."""
    rng = np.random.default_rng(seed)
    keys, sizes, gb, gl, gd, db, ds, dl = [], [], [], [], [], [], [], []
    for batch in eval_loader(str(shards), batch_size=4, image_size=64, num_workers=0):
        for i in range(len(batch.keys)):
            keys.append(batch.keys[i])
            sizes.append(batch.sizes[i].tolist())
            boxes = batch.boxes[i].numpy().astype(np.float64)
            gb.append(boxes)
            gl.append(batch.labels[i].numpy())
            gd.append(batch.difficult[i].numpy())
            db.append(boxes + jitter)
            ds.append(rng.uniform(0.5, 1.0, len(boxes)))
            dl.append(batch.labels[i].numpy())
    return Collected(keys, np.array(sizes), gb, gl, gd, db, ds, dl, [], 1.0)


def test_perfect_detections_score_one_everywhere(uneven_shards, classes):
    result = score_detections(_collected_from_ground_truth(uneven_shards), classes)
    for key in SUMMARY_KEYS:
        value = result.summary[key]
        assert math.isnan(value) or value == pytest.approx(1.0), key  # NaN only for an empty size group
    assert result.summary["map_voc07"] == pytest.approx(1.0) and result.summary["map_coco"] == pytest.approx(1.0)


def test_detections_off_by_a_box_width_score_zero(uneven_shards, classes):
    # Shifting every box right and down by 1000 px leaves no overlap: every detection is a false positive.
    result = score_detections(_collected_from_ground_truth(uneven_shards, jitter=1000.0), classes)
    assert result.summary["map_voc07"] == 0.0 and result.summary["map_voc"] == 0.0
    assert result.summary["map_coco"] == 0.0 and result.summary["ap50"] == 0.0
