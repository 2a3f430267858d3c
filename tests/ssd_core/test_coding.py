"""ssd_core.coding: hand-derived targets, the round trip both ways, broadcasting and errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssd_core.coding import decode_boxes, encode_boxes


def test_encode_hand_values():
    prior = torch.tensor([0.5, 0.5, 0.2, 0.4])  # cx, cy, w, h
    boxes = torch.tensor(
        [
            # centre (0.55, 0.55), size (0.2, 0.4): t_cx = 0.05 / 0.2 / 0.1 = 2.5, t_cy = 0.05 / 0.4 / 0.1 = 1.25,
            # sizes equal the prior's: log(1) / 0.2 = 0.
            [0.45, 0.35, 0.65, 0.75],
            # centred on the prior, twice as wide and half as tall: t_w = log 2 / 0.2, t_h = log(1/2) / 0.2.
            [0.3, 0.4, 0.7, 0.6],
        ]
    )
    expected = torch.tensor([[2.5, 1.25, 0.0, 0.0], [0.0, 0.0, math.log(2) / 0.2, -math.log(2) / 0.2]])
    torch.testing.assert_close(encode_boxes(boxes, prior), expected)
    torch.testing.assert_close(decode_boxes(expected, prior), boxes)


def test_variances_scale_the_targets():
    prior = torch.tensor([0.5, 0.5, 0.2, 0.4])
    box = torch.tensor([0.45, 0.35, 0.65, 0.75])
    # With unit variances the centre offsets are 0.25 and 0.125 (the raw offsets over prior size).
    torch.testing.assert_close(encode_boxes(box, prior, variances=(1.0, 1.0)), torch.tensor([0.25, 0.125, 0.0, 0.0]))


def test_broadcasting_priors_against_a_batch():
    gen = torch.Generator().manual_seed(0)
    priors = torch.cat((torch.rand(7, 2, generator=gen), 0.05 + torch.rand(7, 2, generator=gen) * 0.5), dim=1)
    corner = torch.rand(3, 7, 2, generator=gen) * 0.5
    boxes = torch.cat((corner, corner + 0.05 + torch.rand(3, 7, 2, generator=gen) * 0.4), dim=-1)  # [3, 7, 4]
    loc = encode_boxes(boxes, priors)  # priors [7, 4] broadcast over the batch
    assert loc.shape == (3, 7, 4)
    torch.testing.assert_close(loc[2, 5], encode_boxes(boxes[2, 5], priors[5]))


unit = st.floats(0.0, 1.0, width=32)
size = st.floats(1 / 256, 1.0, width=32)


@settings(max_examples=80, deadline=None)
@given(x=unit, y=unit, w=size, h=size, pcx=unit, pcy=unit, pw=size, ph=size)
def test_decode_inverts_encode(x, y, w, h, pcx, pcy, pw, ph):
    box = torch.tensor([x, y, x + w, y + h], dtype=torch.float64)
    prior = torch.tensor([pcx, pcy, pw, ph], dtype=torch.float64)
    torch.testing.assert_close(decode_boxes(encode_boxes(box, prior), prior), box, atol=1e-9, rtol=1e-9)


@settings(max_examples=80, deadline=None)
@given(t=st.lists(st.floats(-5.0, 5.0), min_size=4, max_size=4), pw=size, ph=size)
def test_encode_inverts_decode(t, pw, ph):
    loc = torch.tensor(t, dtype=torch.float64)
    prior = torch.tensor([0.5, 0.5, pw, ph], dtype=torch.float64)
    torch.testing.assert_close(encode_boxes(decode_boxes(loc, prior), prior), loc, atol=1e-7, rtol=1e-7)


def test_float32_round_trip_on_random_boxes():
    gen = torch.Generator().manual_seed(3)
    priors = torch.cat((torch.rand(500, 2, generator=gen), 0.02 + torch.rand(500, 2, generator=gen)), dim=1)
    corner = torch.rand(500, 2, generator=gen)
    boxes = torch.cat((corner, corner + 0.01 + torch.rand(500, 2, generator=gen)), dim=1)
    torch.testing.assert_close(decode_boxes(encode_boxes(boxes, priors), priors), boxes, atol=2e-6, rtol=0)


def test_errors_name_the_function_and_shapes():
    with pytest.raises(ValueError, match=r"encode_boxes: expected \[\.\.\., 4\].*\[3\]"):
        encode_boxes(torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="decode_boxes: expected variances"):
        decode_boxes(torch.zeros(4), torch.ones(4), variances=(0.1, 0.0))
