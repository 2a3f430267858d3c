"""ssd_core.augment.plan: the draws of one image's plan and the geometry of each step, checked directly."""

import math

import pytest
import torch

from ssd_core.augment import (
    CROP_MIN_IOUS,
    FILL_COLOUR,
    PHOTOMETRIC_DRAWS,
    Expansion,
    plan_augmentation,
    render_augmentation,
    sample_crop,
    sample_expansion,
    train_transform,
)
from ssd_core.boxes import box_iou
from ssd_core.reference import canvas_window
from tests.ssd_core.augment.helpers import ALL, CROP_ONLY, assert_valid, crop_at_exactly_half_iou, gen, random_sample


def test_image_without_boxes():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=gen(0))
    empty = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.bool)
    cropped = 0
    for seed in range(30):
        sample = train_transform(image, *empty, size=32, options=ALL, generator=gen(seed))
        assert_valid(sample, 32, 0)
        # Without boxes there is nothing to satisfy: every option but "whole image" yields a crop.
        choice = sample_crop(torch.zeros(0, 4), 70, 50, gen(seed))
        assert (choice.window is None) == (choice.min_iou is None)
        cropped += choice.window is not None
    assert cropped > 0


def test_sample_expansion_ranges():
    ratios = []
    for seed in range(200):
        e = sample_expansion(50, 30, 4.0, gen(seed))
        assert 0 <= e.left <= e.canvas_width - 50 and 0 <= e.top <= e.canvas_height - 30
        assert e.canvas_width <= 200 and e.canvas_height <= 120
        ratios.append(e.canvas_width / 50)
    expanded = sum(r > 1 for r in ratios)
    assert 60 < expanded < 140  # probability 1/2
    assert max(ratios) > 3.0
    assert sample_expansion(50, 30, 1.0, gen(0)) == Expansion(50, 30, 0, 0)


@pytest.mark.parametrize("seed", range(10))
def test_expansion_keeps_box_contents(seed):
    # Integer-pixel boxes: after expansion the canvas pixels inside each moved box are exactly the
    # original pixels inside the box, and everything outside the placed image is the mean colour.
    g = gen(seed)
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=g)
    boxes_px = torch.tensor([[3, 4, 20, 25], [10, 0, 40, 30], [0, 12, 7, 13]])
    e = Expansion(40, 30, 0, 0)
    while e.canvas_width == 40:  # a seed that expands
        e = sample_expansion(40, 30, 4.0, g)
    canvas = canvas_window(image, e)
    assert canvas.shape == (3, e.canvas_height, e.canvas_width)
    for x0, y0, x1, y1 in boxes_px.tolist():
        moved = canvas[:, y0 + e.top : y1 + e.top, x0 + e.left : x1 + e.left]
        assert torch.equal(moved, image[:, y0:y1, x0:x1].float())
    outside = torch.ones(e.canvas_height, e.canvas_width, dtype=torch.bool)
    outside[e.top : e.top + 30, e.left : e.left + 40] = False
    fill = torch.tensor(FILL_COLOUR).view(3, 1)
    assert torch.equal(canvas[:, outside], fill.expand(3, int(outside.sum())))


def test_crop_geometry_and_kept_boxes():
    options_seen = set()
    for seed in range(150):
        g = gen(seed)
        w, h = int(torch.randint(30, 400, (), generator=g)), int(torch.randint(30, 400, (), generator=g))
        n = int(torch.randint(1, 6, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.8
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w, h]) * 0.5 + 1
        boxes_px = torch.cat([xy, xy + wh], dim=-1)
        choice = sample_crop(boxes_px, w, h, gen(seed))
        options_seen.add(choice.min_iou)
        if choice.window is None:
            assert choice.keep.all()
            continue
        x0, y0, x1, y1 = choice.window
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 >= math.floor(0.3 * w) - 1 and y1 - y0 >= math.floor(0.3 * h) - 1
        centres = (boxes_px[:, :2] + boxes_px[:, 2:]) / 2
        inside = (centres[:, 0] > x0) & (centres[:, 0] < x1) & (centres[:, 1] > y0) & (centres[:, 1] < y1)
        assert torch.equal(choice.keep, inside)
        assert choice.keep.any()
        window = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float64)
        assert box_iou(window, boxes_px.double()).max() >= choice.min_iou
    assert options_seen == set(CROP_MIN_IOUS)


def test_crop_gives_up_uncropped_when_no_trial_fits():
    # A 2 x 2 box in a 400 x 400 image: any crop of side >= 120 has IoU <= 4 / 14400 with it, so the
    # min-IoU options (0.1 .. 0.9) can never be met and the image must stay whole.
    boxes_px = torch.tensor([[100.0, 100.0, 102.0, 102.0]])
    constrained = 0
    for seed in range(40):
        choice = sample_crop(boxes_px, 400, 400, gen(seed))
        if choice.min_iou is not None and choice.min_iou > 0:
            assert choice.window is None and choice.keep.all()
            constrained += 1
    assert constrained > 0


@pytest.mark.parametrize("seed", range(15))
def test_train_transform_crop_keeps_centre_boxes_clipped(seed):
    image, boxes, labels, difficult = random_sample(40 + seed)
    if boxes.shape[0] == 0:
        return
    s = train_transform(image, boxes, labels, difficult, size=50, options=CROP_ONLY, generator=gen(seed))
    h, w = image.shape[1:]
    boxes_px = boxes.double() * torch.tensor([w, h, w, h])
    choice = sample_crop(boxes_px, w, h, gen(seed))  # the same draws
    x0, y0, x1, y1 = choice.window or (0, 0, w, h)
    kept = boxes_px[choice.keep]
    lo, hi = torch.tensor([x0, y0, x0, y0], dtype=torch.float64), torch.tensor([x1, y1, x1, y1], dtype=torch.float64)
    want = (torch.maximum(torch.minimum(kept, hi), lo) - lo) / (hi - lo)
    assert torch.equal(s.labels, labels[choice.keep]) and torch.equal(s.difficult, difficult[choice.keep])
    torch.testing.assert_close(s.boxes, want.float(), atol=1e-6, rtol=0)


def test_plan_is_the_geometry_and_render_the_pixels():
    image, boxes, labels, difficult = random_sample(6)
    h, w = image.shape[1:]
    plan = plan_augmentation(w, h, boxes, labels, difficult, options=ALL, generator=gen(5))
    sample = train_transform(image, boxes, labels, difficult, size=40, options=ALL, generator=gen(5))
    assert torch.equal(plan.boxes, sample.boxes) and torch.equal(plan.labels, sample.labels)
    assert torch.equal(render_augmentation(image, plan, 40), sample.image)
    # The plan draws everything: photometric 11, expansion 4, crop 1 + 4 x 50, flip 1.
    g = gen(5)
    plan_augmentation(w, h, boxes, labels, difficult, options=ALL, generator=g)
    reference = gen(5)
    torch.rand(PHOTOMETRIC_DRAWS + 4 + 1 + 4 * 50 + 1, generator=reference, dtype=torch.float64)
    assert torch.equal(g.get_state(), reference.get_state())


def test_crop_rules_at_exactly_their_boundaries(monkeypatch):
    # A trial whose best IoU equals the option's minimum satisfies it (Caffe's SatisfySampleConstraint rejects
    # only IoU < min); a box whose centre lies on the window's edge is not inside (helpers: the derivation).
    width, height, boxes, labels, difficult = crop_at_exactly_half_iou(monkeypatch)
    plan = plan_augmentation(width, height, boxes, labels, difficult, options=CROP_ONLY, generator=gen(0))
    assert plan.window == (0, 0, 64, 127)
    assert plan.boxes.tolist() == [[0.0, 0.0, 1.0, 1.0]] and plan.labels.tolist() == [3]
