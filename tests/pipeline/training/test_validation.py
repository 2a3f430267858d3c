"""Validation during training, on one process: rank slices merge into evaluate's collection, the scores are
evaluate's, and val/loss is the split's loss computed one image at a time (a slower, independent route).

The distributed run (2 Ray workers, gathered detections, equal to ``python -m pipeline evaluate`` to 1e-6)
is in ``test_ray_validation.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import EvalConfig
from pipeline.report.scoring import run_inference, score_detections
from pipeline.shards.eval_loader import eval_loader
from pipeline.stages.train import build_job
from pipeline.training.validation import Validator, merge_slices
from ssd_core.augment import normalize_images
from ssd_core.loss import multibox_loss
from ssd_core.matching import assign_targets
from tests.pipeline.fixtures import make_params, random_tiny_ssd

CFG = EvalConfig(batch_size=2, num_sample_images=0)


@pytest.fixture(scope="module")
def classes(uneven_shards):
    return json.loads((uneven_shards / "manifest.json").read_text())["classes"]


@pytest.fixture(scope="module")
def model(classes):
    return random_tiny_ssd(len(classes) + 1, seed=3)


def _collect(model, shards, rank=0, world=1):
    return run_inference(
        model, str(shards), CFG, device=torch.device("cpu"), num_workers=0, progress=False, rank=rank, world_size=world
    )


def test_rank_slices_are_disjoint_cover_the_split_and_merge_into_the_single_process_collection(model, uneven_shards):
    whole = _collect(model, uneven_shards)  # 5 validation images: batches [0, 1], [2, 3], [4]
    slices = [_collect(model, uneven_shards, rank, 2) for rank in range(2)]
    assert [s.order.tolist() for s in slices] == [[0, 1, 4], [2, 3]]  # rank 0: batches 0 and 2, rank 1: batch 1
    merged = merge_slices(slices)
    assert merged.keys == whole.keys and merged.order.tolist() == list(range(5))
    np.testing.assert_array_equal(merged.sizes, whole.sizes)
    for field in ("gt_boxes", "gt_labels", "gt_difficult", "det_boxes", "det_scores", "det_labels"):
        for a, b in zip(getattr(merged, field), getattr(whole, field), strict=True):
            np.testing.assert_array_equal(a, b)
    assert sum(len(d) for d in whole.det_scores) > 0  # there is something to score


def test_merge_refuses_slices_that_miss_or_repeat_an_image(model, uneven_shards):
    rank0 = _collect(model, uneven_shards, 0, 2)
    with pytest.raises(ValueError, match="exactly once"):
        merge_slices([rank0])
    with pytest.raises(ValueError, match="exactly once"):
        merge_slices([rank0, rank0])


def test_eval_loader_refuses_a_rank_outside_the_world(uneven_shards):
    with pytest.raises(ValueError, match="rank"):
        eval_loader(str(uneven_shards), batch_size=2, image_size=160, num_workers=0, rank=2, world_size=2)


def _reference_loss(model, shards, iou_threshold: float) -> float:
    """Loss summed over every prior of every image, one image at a time, over the split's matched priors."""
    total, positives = 0.0, 0
    priors = model.priors()
    for batch in eval_loader(str(shards), batch_size=1, image_size=model.image_size, num_workers=0):
        width, height = batch.sizes[0].tolist()
        boxes = batch.boxes[0] / torch.tensor([width, height, width, height], dtype=torch.float32)  # [G, 4]
        n = len(batch.labels[0])
        targets = assign_targets(
            boxes[None],
            batch.labels[0][None],
            torch.ones(1, n, dtype=torch.bool),
            priors,
            iou_threshold=iou_threshold,
            gt_difficult=batch.difficult[0][None],
        )
        with torch.no_grad():
            out = model(normalize_images(batch.images))
        terms = multibox_loss(out.loc, out.cls_logits, targets.loc_targets, targets.cls_targets)
        count = int(terms.num_positives)
        total += float(terms.total) * max(count, 1)
        positives += count
    return total / max(positives, 1)


def test_validator_scores_what_evaluate_scores_and_the_split_loss(model, uneven_shards, classes, tmp_path):
    params = make_params(**{"train.val_every_steps": 4, "train.max_steps": 10, "eval.batch_size": 2})
    job = build_job(str(uneven_shards), params, tmp_path)
    validator = Validator(job, 0, 1, model, torch.device("cpu"))
    assert [s for s in range(1, 11) if validator.due(s)] == [4, 8, 10]  # every 4 steps and the last
    scores = validator.run(model.state_dict())
    expected = score_detections(_collect(model, uneven_shards), classes).summary
    for key, value in expected.items():
        assert scores[f"val/{key}"] == pytest.approx(value, abs=1e-12, nan_ok=True), key
    reference = _reference_loss(model, uneven_shards, params.train.iou_threshold)
    assert scores["val/loss"] == pytest.approx(reference, rel=1e-5)


def test_validator_scores_a_channels_last_model_as_its_contiguous_copy(model, uneven_shards, tmp_path):
    """Training keeps channels-last weights; validation scores them with a contiguous model, as evaluate does."""
    params = make_params(**{"train.val_every_steps": 1, "eval.batch_size": 2})
    job = build_job(str(uneven_shards), params, tmp_path)
    live = model.to(memory_format=torch.channels_last)
    try:
        scores = Validator(job, 0, 1, live, torch.device("cpu")).run(live.state_dict())
    finally:
        model.to(memory_format=torch.contiguous_format)
    plain = Validator(job, 0, 1, model, torch.device("cpu")).run(model.state_dict())
    for key in ("val/map_voc07", "val/map_coco", "val/loss"):
        assert scores[key] == plain[key], key
