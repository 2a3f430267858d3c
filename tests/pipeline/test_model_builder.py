"""The one model builder: model.priors reaches the network (voc, coco, custom), the recipes' priors are the
paper's, and a COCO recipe trained for one step records COCO priors in its checkpoint and model file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.artifacts.model_file import load_model_file, save_model_file
from pipeline.config import ConfigError, load_params
from pipeline.model_builder import build_model, build_recorded, prior_spec_for
from pipeline.training import checkpoint
from pipeline.training.job import TrainJob
from pipeline.training.state import build_model as build_training_model
from pipeline.training.state import build_state, find_resume_checkpoint
from pipeline.training.step import train_step
from ssd_core.model import SSD_TINY_PRIORS
from ssd_core.priors import SSD300_COCO, SSD300_VOC, SSD512_COCO, SSD512_VOC
from tests.pipeline.fixtures import make_params
from tests.pipeline.training.tiny import tiny_batch

REPO = Path(__file__).resolve().parents[2]
CUSTOM_TINY = {
    "model.priors": "custom",
    "model.prior_spec.min_sizes": [12, 30, 60, 90, 130],
    "model.prior_spec.max_sizes": [30, 60, 90, 130, 160],
    "model.prior_spec.aspect_ratios": "[[2],[2,3],[2,3],[2],[3]]",
}


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("params/voc_ssd300.yaml", SSD300_VOC),
        ("params/voc_ssd512.yaml", SSD512_VOC),
        ("params/coco_ssd300.yaml", SSD300_COCO),
        ("params/coco_ssd512.yaml", SSD512_COCO),
        ("params.yaml", SSD_TINY_PRIORS),
    ],
)
def test_every_recipe_builds_the_priors_it_names(recipe, expected):
    params = load_params(REPO / recipe)
    assert prior_spec_for(params.model) == expected
    with torch.device("meta"):
        assert build_model(params.model, ["a", "b"]).prior_spec == expected


def test_the_coco_boxes_are_the_papers():
    """Caffe ssd_coco.py at 300 px: min_ratio 15, max_ratio 90, step floor((90 - 15) / (6 - 2)) = 18, so levels
    2..6 get 15, 33, 51, 69, 87 % of 300 = 45, 99, 153, 207, 261 px (max: the next one, 105 % = 315), and
    conv4_3 gets 7 % = 21 px with max 45 (15 %). The VOC model's are 30, 60, 111, ... (min_ratio 20)."""
    priors = build_model(load_params(REPO / "params/coco_ssd300.yaml").model, ["x"]).priors()
    # prior 0: conv4_3 location (0, 0): centre (0.5 * 8) / 300, side 21 / 300
    assert torch.allclose(priors[0], torch.tensor([4 / 300, 4 / 300, 0.07, 0.07]), atol=1e-7)
    # prior 1: the extra square sqrt(21 * 45) = 30.74 px
    assert priors[1, 2].item() == pytest.approx(math.sqrt(21 * 45) / 300, abs=1e-7)
    # the VOC model's first box would be 30 px = 0.1: the preset did reach the network
    assert priors[0, 2].item() != pytest.approx(0.1)


def test_custom_priors_reach_the_network_on_its_own_maps_and_steps():
    model = build_model(make_params(**CUSTOM_TINY).model, ["a"])
    spec = model.prior_spec
    assert spec.feature_maps == SSD_TINY_PRIORS.feature_maps and spec.steps == SSD_TINY_PRIORS.steps
    assert spec.min_sizes == (12, 30, 60, 90, 130) and spec.aspect_ratios[4] == (3.0,)
    # boxes per location: 2 squares + 2 per ratio -> 4, 6, 6, 4, 4 as the preset (its last level has ratio 2)
    assert spec.num_priors == SSD_TINY_PRIORS.num_priors
    priors = model.priors()
    assert priors[0, 2].item() == pytest.approx(12 / 160)  # first box: 12 px of 160


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.priors": "coco"}, r"model\.priors: ssd_tiny has no 'coco' preset boxes"),
        ({"model.prior_spec.min_sizes": [1, 2]}, r"model\.prior_spec: only read with model\.priors=custom"),
        (
            {**CUSTOM_TINY, "model.prior_spec.min_sizes": [12, 30, 60]},
            r"model\.prior_spec\.min_sizes: expected one entry per level \(ssd_tiny has 5 source maps "
            r"\(20, 10, 5, 3, 1\) at 160 px input\), got 3",
        ),
        (
            {**CUSTOM_TINY, "model.prior_spec.max_sizes": [30, 60, 90, 130, 100]},
            r"model\.prior_spec\.max_sizes\[4\]: 100\.0 is smaller than min_sizes\[4\] = 130\.0",
        ),
        (
            {**CUSTOM_TINY, "model.prior_spec.aspect_ratios": "[[2],[2,3],[2,3],[2],[0.5]]"},
            r"model\.prior_spec\.aspect_ratios\[4\]: expected distinct ratios in \(1, 100\]",
        ),
        (
            {**CUSTOM_TINY, "model.prior_spec.steps": [8, 16, 32, 53, 400]},
            r"model\.prior_spec\.steps\[4\]: the last of 1 centres, \(1 - 0\.5\) x 400\.0, lies outside",
        ),
        (
            {**CUSTOM_TINY, "model.prior_spec.min_sizes": [12, 30, 60, 90, 0]},
            r"model\.prior_spec\.min_sizes: expected sizes in \(0, 640\] input pixels, got \[0\.0\]",
        ),
    ],
)
def test_bad_priors_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_params(**overrides)


def test_build_recorded_rebuilds_exactly_the_recorded_priors():
    model = build_model(make_params(**CUSTOM_TINY).model, ["a", "b"])
    again = build_recorded("ssd_tiny", 3, model.prior_spec.to_dict())
    assert again.prior_spec == model.prior_spec and torch.equal(again.priors(), model.priors())
    with pytest.raises(ValueError, match="prior_spec has 5 levels"):
        build_recorded("ssd300_vgg16", 3, model.prior_spec.to_dict())


@pytest.mark.slow
def test_a_coco_recipe_trained_one_step_records_coco_priors(tmp_path):
    """The recipe's own params (no backbone file, batch 1), one real optimiser step, the checkpoint, the model
    file written from it as train does, and that file loaded back: COCO priors everywhere."""
    params = load_params(
        REPO / "params/coco_ssd300.yaml",
        ["model.pretrained_backbone=", "train.batch_size=1", "train.num_workers=1", "train.precision=fp32"],
    )
    job = TrainJob(params, str(tmp_path / "shards"), ("a", "b", "c"), str(tmp_path / "run"), str(tmp_path), "0" * 64)
    model = build_training_model(job, None)
    state = build_state(job, model, 1, None)
    batch = tiny_batch(model.image_size)
    one = batch._replace(**{k: getattr(batch, k)[:1] for k in ("images", "boxes", "labels", "difficult", "mask")})
    stats = train_step(model, one, model.priors(), state.optimizer, cfg=params.train, scaler=state.scaler).read()
    state.end_step(stats.finite)
    assert stats.finite and state.step == 1
    contents, meta = state.checkpoint(job, epoch=0, world=1, bad_samples=0, tracking_run_id=None)
    checkpoint.write_checkpoint(checkpoint.join(job.run_uri, checkpoint.dir_name(1)), contents, meta)

    resumed = find_resume_checkpoint(job, None, world=1)
    assert resumed is not None and resumed.state["prior_spec"] == SSD300_COCO.to_dict()
    final = build_recorded(resumed.state["preset"], job.num_classes, resumed.state["prior_spec"])
    final.load_state_dict(resumed.state["model"])
    save_model_file(tmp_path / "ssd.pt", final, classes=list(job.classes), params={})
    loaded = load_model_file(tmp_path / "ssd.pt")
    assert loaded.prior_spec == SSD300_COCO and loaded.model.prior_spec == SSD300_COCO
    priors = loaded.model.priors()
    assert priors.shape == (8732, 4)
    assert priors[0, 2].item() == pytest.approx(21 / 300) and priors[-4, 2].item() == pytest.approx(261 / 300)


def test_a_checkpoint_of_other_priors_is_not_resumed(tmp_path):
    job = TrainJob(make_params(), str(tmp_path / "s"), ("a", "b", "c"), str(tmp_path / "run"), str(tmp_path), "0" * 64)
    state = build_state(job, build_training_model(job, None), 1, None)
    contents, meta = state.checkpoint(job, epoch=0, world=1, bad_samples=0, tracking_run_id=None)
    contents["prior_spec"] = {**contents["prior_spec"], "min_sizes": [1.0, 2.0, 3.0, 4.0, 5.0]}
    checkpoint.write_checkpoint(checkpoint.join(job.run_uri, checkpoint.dir_name(0)), contents, meta)
    with pytest.raises(ValueError, match="checkpoint trained with priors"):
        find_resume_checkpoint(job, None, world=1)
