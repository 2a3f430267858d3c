"""ssd_core.boxes: conversions, IoU (hand values, a slow reference, properties), clipping, validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd_core.boxes import (
    box_area,
    box_iou,
    clip_boxes,
    cxcywh_to_xyxy,
    degenerate_box_mask,
    validate_boxes,
    xyxy_to_cxcywh,
)


def reference_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU by the definition, one pair at a time in Python floats."""
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, (ax1, ay1, ax2, ay2) in enumerate(a.tolist()):
        for j, (bx1, by1, bx2, by2) in enumerate(b.tolist()):
            iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
            ih = max(0.0, min(ay2, by2) - max(ay1, by1))
            union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - iw * ih
            out[i, j] = iw * ih / union if union > 0 else 0.0
    return out


def random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    corner = torch.rand(n, 2, generator=gen) * 0.8
    size = 0.01 + torch.rand(n, 2, generator=gen) * 0.5
    return torch.cat((corner, corner + size), dim=1)


coordinate = st.floats(0.0, 1.0, allow_nan=False, width=32)
extent = st.floats(1 / 1024, 1.0, allow_nan=False, width=32)


@st.composite
def xyxy_boxes(draw, max_count: int = 6):
    count = draw(st.integers(1, max_count))
    rows = [
        [x, y, x + w, y + h]
        for x, y, w, h in ((draw(coordinate), draw(coordinate), draw(extent), draw(extent)) for _ in range(count))
    ]
    return torch.tensor(rows, dtype=torch.float32)


def test_conversions_on_a_hand_example():
    # (x1, y1, x2, y2) = (0.1, 0.2, 0.5, 0.8): centre ((0.1+0.5)/2, (0.2+0.8)/2) = (0.3, 0.5), size (0.4, 0.6).
    xyxy = torch.tensor([[0.1, 0.2, 0.5, 0.8]])
    cxcywh = torch.tensor([[0.3, 0.5, 0.4, 0.6]])
    torch.testing.assert_close(xyxy_to_cxcywh(xyxy), cxcywh)
    torch.testing.assert_close(cxcywh_to_xyxy(cxcywh), xyxy)


def test_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor(
        [
            [1.0, 1.0, 3.0, 3.0],  # overlap 1x1 = 1, union 4 + 4 - 1 = 7 -> 1/7
            [0.0, 0.0, 2.0, 2.0],  # identical -> 1
            [0.5, 0.5, 1.0, 1.0],  # inside: 0.25 / 4 = 1/16
            [2.0, 0.0, 3.0, 2.0],  # touching edge: no area in common -> 0
            [5.0, 5.0, 6.0, 6.0],  # disjoint -> 0
        ]
    )
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 1 / 16, 0.0, 0.0]]))


def test_iou_matches_reference_on_random_boxes():
    gen = torch.Generator().manual_seed(0)
    a, b = random_boxes(13, gen), random_boxes(17, gen)
    torch.testing.assert_close(box_iou(a, b).double(), reference_iou(a, b), atol=1e-6, rtol=1e-5)


def test_iou_broadcasts_over_leading_dims():
    gen = torch.Generator().manual_seed(1)
    a, b = random_boxes(6, gen).view(2, 3, 4), random_boxes(5, gen)
    batched = box_iou(a, b)  # [2, 3, 5]
    assert batched.shape == (2, 3, 5)
    torch.testing.assert_close(batched[1], box_iou(a[1], b))


def test_iou_with_the_devkit_pixel_offset_by_hand():
    # [0, 0, 9, 9] and [0, 0, 9, 4] as inclusive pixels (offset 1): 10 x 10 and 10 x 5, IoU 50 / 100 = 0.5;
    # as continuous coordinates: 9 x 9 and 9 x 4, IoU 36 / 81.
    a, b = torch.tensor([[0.0, 0.0, 9.0, 9.0]]), torch.tensor([[0.0, 0.0, 9.0, 4.0]])
    assert box_iou(a, b, offset=1.0).item() == 0.5
    assert box_iou(a, b).item() == pytest.approx(36 / 81)
    assert box_area(a, offset=1.0).item() == 100.0


def test_iou_with_offset_is_the_devkit_overlap_bit_for_bit():
    # The VOC devkit's overlap, written as it does (iw, ih, ua in that order), for overlapping pairs; the
    # metric relies on box_iou reproducing it exactly, and on non-overlapping pairs giving 0 (below any threshold).
    gen = torch.Generator().manual_seed(3)
    a = random_boxes(40, gen).double() * 37
    b = random_boxes(50, gen).double() * 37
    for offset in (0.0, 1.0, 0.25):
        det, ref = a[:, None, :], b[None, :, :]  # [N, 1, 4], [1, M, 4]
        iw = torch.minimum(det[..., 2], ref[..., 2]) - torch.maximum(det[..., 0], ref[..., 0]) + offset  # [N, M]
        ih = torch.minimum(det[..., 3], ref[..., 3]) - torch.maximum(det[..., 1], ref[..., 1]) + offset
        ua = (
            (det[..., 2] - det[..., 0] + offset) * (det[..., 3] - det[..., 1] + offset)
            + (ref[..., 2] - ref[..., 0] + offset) * (ref[..., 3] - ref[..., 1] + offset)
            - iw * ih
        )
        overlapping = (iw > 0) & (ih > 0)
        iou = box_iou(a, b, offset=offset)
        assert overlapping.any() and (~overlapping).any()
        assert torch.equal(iou[overlapping], (iw * ih / ua)[overlapping])
        assert bool((iou[~overlapping] == 0).all())


def test_iou_of_two_degenerate_boxes_is_zero_not_nan():
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert box_iou(point, point).item() == 0.0


@settings(max_examples=60, deadline=None)
@given(a=xyxy_boxes(), b=xyxy_boxes())
def test_iou_is_symmetric_and_in_unit_interval(a, b):
    forward, backward = box_iou(a, b), box_iou(b, a)
    torch.testing.assert_close(forward, backward.t())
    assert bool(((forward >= 0) & (forward <= 1)).all())
    # A box overlaps itself completely.
    torch.testing.assert_close(box_iou(a, a).diagonal(), torch.ones(len(a)), atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(boxes=xyxy_boxes())
def test_conversions_round_trip(boxes):
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes, atol=1e-6, rtol=0)
    centre = xyxy_to_cxcywh(boxes)
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(centre)), centre, atol=1e-6, rtol=0)


def test_box_area_never_negative():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.2], [0.6, 0.1, 0.4, 0.3]])  # second is inverted in x
    torch.testing.assert_close(box_area(boxes), torch.tensor([0.1, 0.0]))


def test_clip_boxes_to_unit_square_and_pixels():
    boxes = torch.tensor([[-0.2, 0.1, 1.3, 0.9]])
    torch.testing.assert_close(clip_boxes(boxes), torch.tensor([[0.0, 0.1, 1.0, 0.9]]))
    pixels = torch.tensor([[-5.0, -1.0, 700.0, 300.0]])
    torch.testing.assert_close(clip_boxes(pixels, width=640, height=480), torch.tensor([[0.0, 0.0, 640.0, 300.0]]))
    assert pixels[0, 0] == -5.0  # the argument is not edited in place


def test_degenerate_box_mask():
    boxes = torch.tensor(
        [
            [0.1, 0.1, 0.2, 0.2],
            [0.3, 0.1, 0.3, 0.2],  # zero width
            [0.1, 0.5, 0.2, 0.4],  # negative height
            [math.nan, 0.0, 0.1, 0.1],
            [0.0, 0.0, math.inf, 1.0],
        ]
    )
    assert degenerate_box_mask(boxes).tolist() == [False, True, True, True, True]
    assert degenerate_box_mask(torch.tensor([[0.0, 0.0, 0.05, 0.5]]), min_size=0.1).tolist() == [True]


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ([0.5, 0.2, 0.4, 0.6], "x2 must be greater than x1"),
        ([0.1, 0.6, 0.4, 0.6], "y2 must be greater than y1"),
        ([0.1, math.nan, 0.4, 0.6], "values must be finite"),
    ],
)
def test_validate_boxes_names_the_index_and_the_reason(bad_row, reason):
    boxes = torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3], [0.0, 0.0, 0.1, 0.1], bad_row])
    with pytest.raises(ValueError, match=r"gt\[3\]") as info:
        validate_boxes(boxes, name="gt")
    assert reason in str(info.value)


def test_validate_boxes_shape_and_dtype():
    validate_boxes(torch.zeros(0, 4))  # no boxes is fine
    validate_boxes(torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"expected shape \[N, 4\].*\[3\]"):
        validate_boxes(torch.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        validate_boxes(torch.tensor([[0, 0, 1, 1]]))
