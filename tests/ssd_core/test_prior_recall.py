"""ssd_core.prior_recall: hand-derived recall on tiny grids, the fast per-level IoU against the all-pairs
reference, and a fit that finds boxes of a shape the preset lacks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ssd_core.model import SSD_TINY_PRIORS
from ssd_core.prior_recall import best_prior_iou, fit_prior_sizes, level_best_iou, prior_recall
from ssd_core.priors import SSD300_COCO, SSD300_VOC, PriorSpec, generate_priors

# One 50 x 50 px square prior (and its equal "extra" square) centred in a 100 px image.
ONE_SQUARE = PriorSpec(
    image_size=100, feature_maps=(1,), steps=(100,), min_sizes=(50,), max_sizes=(50,), aspect_ratios=((),)
)


def test_recall_of_hand_made_boxes():
    boxes = torch.tensor(
        [
            [0.25, 0.25, 0.75, 0.75],  # the prior itself: IoU 1
            [0.25, 0.25, 0.75, 0.50],  # half of it: 1250 / 2500 = 0.5, counts at 0.5 (>=)
            [0.00, 0.00, 0.25, 0.25],  # in the corner, touching it: IoU 0
        ]
    )
    assert torch.allclose(best_prior_iou(boxes, generate_priors(ONE_SQUARE)), torch.tensor([1.0, 0.5, 0.0]))
    assert prior_recall(boxes, ONE_SQUARE, 0.5) == pytest.approx(2 / 3)
    assert prior_recall(boxes, ONE_SQUARE, 0.51) == pytest.approx(1 / 3)
    assert prior_recall(boxes[:0], ONE_SQUARE, 0.5) == 1.0


def test_a_2x2_grid_picks_the_nearest_centre():
    """Centres at 25 and 75 px of 100 (step 50), 30 px squares: a 30 px box centred at (70, 30) overlaps the
    (75, 25) prior by 25 x 25 = 625 of 900 + 900 - 625 = 1175 -> IoU 0.5319; every other prior less."""
    spec = PriorSpec(100, (2,), (50,), (30,), (30,), ((),))
    box = torch.tensor([[0.55, 0.15, 0.85, 0.45]])
    expected = 625 / 1175
    assert best_prior_iou(box, generate_priors(spec)).item() == pytest.approx(expected, abs=1e-6)
    assert level_best_iou(box, spec).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "spec",
    [SSD_TINY_PRIORS, SSD300_VOC, SSD300_COCO, dataclasses.replace(SSD_TINY_PRIORS, clip=True), ONE_SQUARE],
    ids=["tiny", "ssd300_voc", "ssd300_coco", "tiny_clipped", "one_square"],
)
def test_the_per_level_form_equals_the_all_pairs_reference(spec):
    generator = torch.Generator().manual_seed(0)
    centre = torch.rand(500, 2, generator=generator)
    size = torch.rand(500, 2, generator=generator) ** 2  # many small boxes, some large
    boxes = torch.cat((centre - size / 2, centre + size / 2), dim=1).clamp(0, 1)  # [N, 4], some cut at the border
    fast = level_best_iou(boxes, spec)
    assert fast.shape == (len(spec.feature_maps), 500)
    reference = best_prior_iou(boxes, generate_priors(spec))
    assert torch.allclose(fast.amax(dim=0), reference, atol=1e-6)


def _tall_boxes(n: int) -> torch.Tensor:
    """Boxes 8 x 40 px of 160 (ratio 1:5) anywhere in the middle: ssd_tiny's thinnest prior is 1:3."""
    generator = torch.Generator().manual_seed(1)
    centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
    half = torch.tensor([0.025, 0.125])
    return torch.cat((centre - half, centre + half), dim=1)


def test_the_fit_finds_a_shape_the_preset_lacks_and_never_scores_below_it():
    boxes = _tall_boxes(400)
    start = prior_recall(boxes, SSD_TINY_PRIORS, 0.5)
    assert start == 0.0  # 1:5 boxes never reach 0.5 with 1:3 priors at these sizes
    fit = fit_prior_sizes(boxes, SSD_TINY_PRIORS, 0.5, trials=300, seed=0)
    assert fit.start_recall == start and fit.recall >= 0.5
    assert prior_recall(boxes, fit.spec, 0.5) == pytest.approx(fit.recall)
    kept = ("image_size", "feature_maps", "steps", "clip", "boxes_per_location")
    assert all(getattr(fit.spec, k) == getattr(SSD_TINY_PRIORS, k) for k in kept)


def test_the_fit_keeps_the_start_when_nothing_beats_it():
    boxes = torch.tensor([[0.25, 0.25, 0.75, 0.75]])  # matched exactly: recall 1, mean IoU 1
    fit = fit_prior_sizes(boxes, ONE_SQUARE, 0.5, trials=20)
    assert fit.spec == ONE_SQUARE and (fit.recall, fit.mean_iou) == (1.0, pytest.approx(1.0))
    with pytest.raises(ValueError, match="at least one box"):
        fit_prior_sizes(boxes[:0], ONE_SQUARE, 0.5)
