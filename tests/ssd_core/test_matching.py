"""ssd_core.matching: hand examples, ssd_core.reference on random batches, properties and edge cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd_core.boxes import box_iou, cxcywh_to_xyxy
from ssd_core.coding import decode_boxes
from ssd_core.matching import Targets, assign_targets, prior_gt_iou
from ssd_core.priors import SSD300_VOC, PriorSpec, generate_priors
from ssd_core.reference import reference_assign_targets

SSD300_PRIORS = generate_priors(SSD300_VOC)  # [8732, 4]
# A small grid (5x5, 3x3, 1x1 maps; 25*4 + 9*6 + 1*4 = 158 priors) keeps the Python reference quick.
SMALL_PRIORS = generate_priors(
    PriorSpec(300, (5, 3, 1), (60, 100, 300), (60, 150, 240), (150, 240, 300), ((2,), (2, 3), (2,)))
)
# Four 0.5 x 0.5 squares tiling the unit square: p0 top-left, p1 top-right, p2 bottom-left, p3 bottom-right.
QUADRANTS = torch.tensor(
    [[0.25, 0.25, 0.5, 0.5], [0.75, 0.25, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]
)


def random_batch(gen, num_images, num_gt, *, duplicates=True, difficult_rate=0.0):
    """Boxes from tiny to large; some exact duplicates (forced-match conflicts); random padding."""
    corner = torch.rand(num_images, num_gt, 2, generator=gen) * 0.8
    scale = torch.rand(num_images, num_gt, 1, generator=gen) ** 2  # many small boxes
    size = 0.005 + scale * (0.2 + torch.rand(num_images, num_gt, 2, generator=gen) * 0.8)
    boxes = torch.cat((corner, (corner + size).clamp(max=1.0)), dim=-1)
    if duplicates and num_gt > 1:
        boxes[:, 1] = boxes[:, 0]  # box 1 duplicates box 0
    labels = torch.randint(1, 21, (num_images, num_gt), generator=gen)
    mask = torch.rand(num_images, num_gt, generator=gen) < 0.8
    difficult = torch.rand(num_images, num_gt, generator=gen) < difficult_rate
    boxes[~mask] = torch.nan  # padding may hold anything
    return boxes, labels, mask, difficult


def test_hand_example_quadrants():
    boxes = torch.tensor(
        [
            [
                [0.0, 0.0, 0.5, 0.4],  # IoU with p0: 0.2 / 0.25 = 0.8 -> positive, class 3
                [0.5, 0.5, 0.9, 0.9],  # IoU with p3: 0.16 / 0.25 = 0.64 -> positive, class 7
                [0.6, 0.05, 0.7, 0.15],  # inside p1, IoU 0.01 / 0.25 = 0.04: below 0.5, forced onto p1, class 2
            ]
        ]
    )
    targets = assign_targets(boxes, torch.tensor([[3, 7, 2]]), torch.ones(1, 3, dtype=torch.bool), QUADRANTS)
    assert isinstance(targets, Targets)
    assert targets.cls_targets.tolist() == [[3, 2, 0, 7]]
    # p0 = (0.25, 0.25, 0.5, 0.5) for box centre (0.25, 0.2), size (0.5, 0.4):
    # (0, (0.2 - 0.25) / (0.5 * 0.1), log(0.5 / 0.5) / 0.2, log(0.4 / 0.5) / 0.2) = (0, -1, 0, -1.115718).
    torch.testing.assert_close(targets.loc_targets[0, 0], torch.tensor([0.0, -1.0, 0.0, math.log(0.8) / 0.2]))
    assert targets.loc_targets[0, 2].abs().sum() == 0  # background rows hold zeros


def test_forced_conflict_leaves_no_box_without_a_prior():
    # Two identical boxes, IoU 0.225 / 0.25 = 0.9 with p0 and 0 with the rest. The original code gives p0 to the
    # later box and nothing to the earlier one. Here the later box keeps p0 (exact tie) and the earlier one takes
    # its best prior still free: all have IoU 0, so the lowest index, p1.
    box = [0.0, 0.0, 0.5, 0.45]
    targets = assign_targets(
        torch.tensor([[box, box]]), torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.bool), QUADRANTS
    )
    assert targets.cls_targets.tolist() == [[2, 1, 0, 0]]


def test_forced_conflict_goes_to_the_higher_iou():
    # Box 0 covers p0 exactly (IoU 1), box 1 is slightly smaller (IoU 0.9): box 0 keeps p0 even though box 1 is
    # later; box 1's best free prior has IoU 0 with it, so the lowest free index, p1.
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.45, 0.5]]])
    targets = assign_targets(boxes, torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.bool), QUADRANTS)
    assert targets.cls_targets.tolist() == [[5, 6, 0, 0]]


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_reference_on_random_batches(seed):
    gen = torch.Generator().manual_seed(seed)
    boxes, labels, mask, difficult = random_batch(gen, 4, 7, difficult_rate=0.2 if seed % 2 else 0.0)
    threshold = (0.5, 0.35, 0.7)[seed % 3]
    targets = assign_targets(
        boxes, labels, mask, SMALL_PRIORS, iou_threshold=threshold, gt_difficult=difficult if seed % 2 else None
    )
    loc, cls = reference_assign_targets(
        boxes, labels, mask, SMALL_PRIORS, iou_threshold=threshold, gt_difficult=difficult if seed % 2 else None
    )
    assert torch.equal(targets.cls_targets, cls)
    torch.testing.assert_close(targets.loc_targets, loc)


def test_matches_the_reference_on_ssd300_priors():
    gen = torch.Generator().manual_seed(11)
    boxes, labels, mask, difficult = random_batch(gen, 2, 6, difficult_rate=0.3)
    targets = assign_targets(boxes, labels, mask, SSD300_PRIORS, gt_difficult=difficult)
    loc, cls = reference_assign_targets(boxes, labels, mask, SSD300_PRIORS, gt_difficult=difficult)
    assert torch.equal(targets.cls_targets, cls)
    torch.testing.assert_close(targets.loc_targets, loc)
    assert int((cls > 0).sum()) > 0 and int((cls < 0).sum()) > 0  # the case exercises both


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prior_gt_iou_equals_box_iou(dtype):
    gen = torch.Generator().manual_seed(5)
    boxes = random_batch(gen, 1, 9, duplicates=False)[0][0].to(dtype)
    boxes = boxes[~boxes.isnan().any(1)]
    priors_xyxy = cxcywh_to_xyxy(SSD300_PRIORS.to(dtype))
    torch.testing.assert_close(prior_gt_iou(priors_xyxy, boxes), box_iou(priors_xyxy, boxes), atol=0, rtol=0)
    # Priors without shared intervals (random) take the same path, just without the savings.
    random_priors = torch.cat((torch.rand(50, 2, generator=gen), 0.1 + torch.rand(50, 2, generator=gen)), 1)
    random_xyxy = cxcywh_to_xyxy(random_priors.to(dtype))
    torch.testing.assert_close(prior_gt_iou(random_xyxy, boxes), box_iou(random_xyxy, boxes), atol=0, rtol=0)


@st.composite
def batches(draw):
    num_images = draw(st.integers(1, 3))
    num_gt = draw(st.integers(1, 6))
    rows = []
    for _ in range(num_images * num_gt):
        if rows and draw(st.booleans()) and draw(st.booleans()):
            rows.append(list(draw(st.sampled_from(rows))))  # a duplicate: the hardest case for forced matches
            continue
        x, y = draw(st.floats(0.0, 0.95)), draw(st.floats(0.0, 0.95))
        w, h = draw(st.floats(0.002, 1.0)), draw(st.floats(0.002, 1.0))
        rows.append([x, y, min(x + w, 1.0), min(y + h, 1.0)])
    boxes = torch.tensor(rows, dtype=torch.float32).view(num_images, num_gt, 4)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=num_images * num_gt, max_size=num_images * num_gt)))
    return boxes, mask.view(num_images, num_gt)


@settings(max_examples=25, deadline=None)
@given(batch=batches())
def test_every_valid_box_gets_a_positive_prior(batch):
    boxes, mask = batch
    labels = torch.arange(1, boxes.shape[1] + 1).expand(mask.shape).contiguous()
    targets = assign_targets(boxes, labels, mask, SSD300_PRIORS)
    decoded = decode_boxes(targets.loc_targets, SSD300_PRIORS)  # [B, P, 4]
    for b, g in mask.nonzero().tolist():
        mine = targets.cls_targets[b] == labels[b, g]
        # Some prior is positive with this box's class and regresses exactly to this box.
        close = (decoded[b][mine] - boxes[b, g]).abs().amax(dim=1) < 1e-5
        assert bool(close.any()), f"box {g} of image {b} got no positive prior"
    assert bool((targets.cls_targets[~mask.any(1)] == 0).all())  # images without boxes: all background


def test_no_objects_in_one_image_or_the_whole_batch():
    gen = torch.Generator().manual_seed(2)
    boxes, labels, mask, _ = random_batch(gen, 3, 4)
    mask[1] = False
    mask[0, 0] = True
    targets = assign_targets(boxes, labels, mask, SSD300_PRIORS)
    assert bool((targets.cls_targets[1] == 0).all()) and bool((targets.loc_targets[1] == 0).all())
    assert bool((targets.cls_targets[0] > 0).any())
    empty = assign_targets(boxes, labels, torch.zeros_like(mask), SSD300_PRIORS)
    assert empty.cls_targets.shape == (3, 8732) and empty.loc_targets.shape == (3, 8732, 4)
    assert bool((empty.cls_targets == 0).all()) and bool((empty.loc_targets == 0).all())
    no_slots = torch.zeros(2, 0, dtype=torch.bool)
    zero_gt = assign_targets(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long), no_slots, SSD300_PRIORS)
    assert bool((zero_gt.cls_targets == 0).all())


def test_one_object_equal_to_a_prior():
    # Prior 8692 (3x3 map, centre 1/6, side 0.71) as a box: IoU 1 with itself; positives are exactly the priors
    # with IoU >= 0.5, all with its class.
    prior = SSD300_PRIORS[8692]
    box = cxcywh_to_xyxy(prior)[None, None]
    targets = assign_targets(box, torch.tensor([[4]]), torch.ones(1, 1, dtype=torch.bool), SSD300_PRIORS)
    expected = box_iou(box[0], cxcywh_to_xyxy(SSD300_PRIORS))[0] >= 0.5
    assert torch.equal(targets.cls_targets[0] == 4, expected)
    assert bool((targets.cls_targets[0][~expected] == 0).all())
    torch.testing.assert_close(targets.loc_targets[0, 8692], torch.zeros(4), atol=1e-6, rtol=0)


def test_box_smaller_than_every_prior_gets_exactly_its_best_prior():
    # 0.005 x 0.005 at (0.5, 0.5): the smallest prior is 0.1 wide, so no IoU reaches 0.5; only the forced match.
    box = torch.tensor([[[0.4975, 0.4975, 0.5025, 0.5025]]])
    targets = assign_targets(box, torch.tensor([[9]]), torch.ones(1, 1, dtype=torch.bool), SSD300_PRIORS)
    positive = (targets.cls_targets[0] > 0).nonzero().squeeze(1)
    best = box_iou(box[0], cxcywh_to_xyxy(SSD300_PRIORS))[0].argmax()
    assert positive.tolist() == [int(best)]
    torch.testing.assert_close(decode_boxes(targets.loc_targets[0, best], SSD300_PRIORS[best]), box[0, 0])


def test_all_difficult_boxes_are_ignored_not_background():
    gen = torch.Generator().manual_seed(4)
    boxes, labels, mask, _ = random_batch(gen, 2, 4, duplicates=False)
    mask[:] = True
    boxes = torch.nan_to_num(boxes, nan=0.25).clamp(0, 1)
    boxes[..., 2:] = torch.maximum(boxes[..., 2:], boxes[..., :2] + 0.05)
    targets = assign_targets(boxes, labels, mask, SSD300_PRIORS, gt_difficult=torch.ones_like(mask))
    assert not bool((targets.cls_targets > 0).any())
    ignored = targets.cls_targets == -1
    for b in range(2):
        iou = box_iou(boxes[b], cxcywh_to_xyxy(SSD300_PRIORS))  # [G, P]
        expected = (iou >= 0.5).any(0)
        expected[iou.argmax(1)] = True  # each box's best prior, even below the threshold
        assert torch.equal(ignored[b], expected)


def test_regular_box_wins_over_a_difficult_one():
    # Box 0 (difficult) and box 1 (regular) both cover p0; p0 is positive for the regular box, p1 stays background.
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.45]]])
    targets = assign_targets(
        boxes,
        torch.tensor([[3, 4]]),
        torch.ones(1, 2, dtype=torch.bool),
        QUADRANTS,
        gt_difficult=torch.tensor([[True, False]]),
    )
    assert targets.cls_targets.tolist() == [[4, 0, 0, 0]]


# ------------------------------------------------------------------------- thresholds at exactly their value
def just_above(value):
    """The next float32 above ``value``: IoUs are float32, and so is the threshold they are compared with."""
    return torch.nextafter(torch.tensor(value), torch.tensor(2.0)).item()


def threshold_priors(threshold):
    """Three priors (cxcywh): p0 = [0, 0, 0.5, 0.5], p1 = [0, 0, 0.5, threshold / 2], p2 = [0.5, 0.5, 1, 1] in xyxy.

    With the box [0, 0, 0.5, 0.5]: IoU(p0) = 1, so p0 is its forced match; p1 lies inside it, IoU(p1) =
    (0.5 * threshold / 2) / 0.25 = threshold, exactly in float32 for the dyadic thresholds used here (every
    coordinate, area and quotient is a short binary fraction); IoU(p2) = 0.
    """
    return torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.25, threshold / 4, 0.5, threshold / 2], [0.75, 0.75, 0.5, 0.5]])


THRESHOLD_BOX = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])


@pytest.mark.parametrize("threshold", [0.25, 0.5, 0.75])
def test_iou_exactly_at_the_threshold_is_positive(threshold):
    priors = threshold_priors(threshold)
    assert prior_gt_iou(cxcywh_to_xyxy(priors), THRESHOLD_BOX[0])[:, 0].tolist() == [1.0, threshold, 0.0]
    labels, mask = torch.tensor([[7]]), torch.ones(1, 1, dtype=torch.bool)
    at = assign_targets(THRESHOLD_BOX, labels, mask, priors, iou_threshold=threshold)
    assert at.cls_targets.tolist() == [[7, 7, 0]]  # ">= threshold": p1 is positive
    assert reference_assign_targets(THRESHOLD_BOX, labels, mask, priors, threshold)[1].tolist() == [[7, 7, 0]]
    above = assign_targets(THRESHOLD_BOX, labels, mask, priors, iou_threshold=just_above(threshold))
    assert above.cls_targets.tolist() == [[7, 0, 0]]  # the forced match only


@pytest.mark.parametrize("threshold", [0.25, 0.5, 0.75])
def test_difficult_box_at_exactly_the_threshold_is_ignored(threshold):
    priors = threshold_priors(threshold)
    labels, mask = torch.tensor([[7]]), torch.ones(1, 1, dtype=torch.bool)
    difficult = mask.clone()
    at = assign_targets(THRESHOLD_BOX, labels, mask, priors, iou_threshold=threshold, gt_difficult=difficult)
    assert at.cls_targets.tolist() == [[-1, -1, 0]]  # its best prior, and p1 at ">= threshold"
    reference = reference_assign_targets(THRESHOLD_BOX, labels, mask, priors, threshold, difficult)[1]
    assert reference.tolist() == [[-1, -1, 0]]
    above = assign_targets(
        THRESHOLD_BOX, labels, mask, priors, iou_threshold=just_above(threshold), gt_difficult=difficult
    )
    assert above.cls_targets.tolist() == [[-1, 0, 0]]


def test_threshold_one_keeps_only_forced_matches():
    gen = torch.Generator().manual_seed(8)
    boxes, labels, mask, _ = random_batch(gen, 2, 5, duplicates=False)
    targets = assign_targets(boxes, labels, mask, SSD300_PRIORS, iou_threshold=1.0)
    assert torch.equal((targets.cls_targets > 0).sum(1), mask.sum(1))


def test_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(9)
    boxes, labels, mask, difficult = random_batch(gen, 2, 5, difficult_rate=0.5)
    copies = [t.clone() for t in (boxes, labels, mask, difficult)]
    assign_targets(boxes, labels, mask, SSD300_PRIORS, gt_difficult=difficult)
    for before, after in zip(copies, (boxes, labels, mask, difficult), strict=True):
        assert torch.equal(before.nan_to_num(), after.nan_to_num())


def test_errors_name_the_box():
    boxes = torch.tensor([[[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4]], [[0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.4, 0.6]]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"gt_boxes\[1, 1\]"):
        assign_targets(boxes, torch.ones(2, 2, dtype=torch.long), mask, QUADRANTS)
    boxes[1, 1] = torch.tensor([0.5, 0.5, 0.6, 0.6])
    with pytest.raises(ValueError, match=r"gt_boxes\[0, 1\].*label 0.*0 is background"):
        assign_targets(boxes, torch.tensor([[1, 0], [1, 1]]), mask, QUADRANTS)
    with pytest.raises(ValueError, match=r"gt_mask must be bool \[2, 2\]"):
        assign_targets(boxes, torch.ones(2, 2, dtype=torch.long), mask.long(), QUADRANTS)
    with pytest.raises(ValueError, match=r"priors must be \[P, 4\]"):
        assign_targets(boxes, torch.ones(2, 2, dtype=torch.long), mask, QUADRANTS[:, :3])
    with pytest.raises(ValueError, match=r"iou_threshold must be in \(0, 1\]"):
        assign_targets(boxes, torch.ones(2, 2, dtype=torch.long), mask, QUADRANTS, iou_threshold=0.0)


def test_priors_without_area_are_rejected():
    priors = QUADRANTS.clone()
    priors[2, 3] = 0.0
    with pytest.raises(ValueError, match=r"priors\[2\].*w, h > 0"):
        assign_targets(
            torch.rand(1, 1, 4).sort(-1).values,
            torch.ones(1, 1, dtype=torch.long),
            torch.zeros(1, 1, dtype=torch.bool),
            priors,
        )


def test_more_boxes_than_priors_terminates_with_every_prior_taken():
    # Six identical boxes, four priors: four boxes get a prior each (the later boxes win the ties), two get none.
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.45]] * 6])
    labels = torch.tensor([[1, 2, 3, 4, 5, 6]])
    targets = assign_targets(boxes, labels, torch.ones(1, 6, dtype=torch.bool), QUADRANTS)
    # p0 (IoU 0.9) goes to box 6; the other priors have IoU 0 with all boxes and go by index to the later boxes.
    assert targets.cls_targets.tolist() == [[6, 5, 4, 3]]
