"""The weight average: hand-derived values of the warmed-up rate, integer buffers copied, bit-exact restore."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.training.ema import WeightAverage


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))


def test_rate_warms_up_then_stays_at_decay():
    average = WeightAverage(_model(), 0.9)
    # (1 + t) / (10 + t): 0.1 at t = 0, 0.5 at t = 8; reaches 0.9 when 1 + t = 0.9 (10 + t), t = 80.
    assert average.rate(0) == pytest.approx(0.1) and average.rate(8) == pytest.approx(0.5)
    assert average.rate(80) == pytest.approx(0.9) and average.rate(10_000) == 0.9


def test_two_updates_by_hand():
    model = _model()
    average = WeightAverage(model, 0.99)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    average.update(model)  # d_0 = 0.1: 0.1 w0 + 0.9 (w0 + 1) = w0 + 0.9
    torch.testing.assert_close(average.weights["0.weight"], w0 + 0.9)
    assert int(average.weights["1.num_batches_tracked"]) == 7  # integers are copied, not averaged
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(model)  # d_1 = 2 / 11: (2/11)(w0 + 0.9) + (9/11)(w0 + 2) = w0 + (1.8 + 18) / 11
    torch.testing.assert_close(average.weights["0.weight"], w0 + 19.8 / 11)
    assert average.updates == 2


def test_restored_average_continues_bit_for_bit():
    model = _model()
    straight = WeightAverage(model, 0.999)
    steps = []
    for i in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        steps.append(copy.deepcopy(model))
    for m in steps[:3]:
        straight.update(m)
    saved = copy.deepcopy(straight.state_dict())
    for m in steps[3:]:
        straight.update(m)
    resumed = WeightAverage(_model(), 0.999)
    resumed.load_state_dict(saved)
    for m in steps[3:]:
        resumed.update(m)
    assert resumed.updates == straight.updates == 6
    for key, value in straight.weights.items():
        assert torch.equal(resumed.weights[key], value), key


def test_refuses_a_decay_outside_the_open_interval_and_a_foreign_state():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_model(), 1.0)
    with pytest.raises(ValueError, match="another model"):
        WeightAverage(_model(), 0.5).load_state_dict({"updates": 0, "weights": {"x": torch.zeros(1)}})
