"""pipeline.training.grad_stats: per-layer statistics against hand values and a slow reference; names; artifacts."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.utils.validation import _validate_metric_name
from torch import nn

from pipeline.tracking import legal_metric_name
from pipeline.training.grad_stats import STAT_NAMES, GradStats, layer_name


def test_hand_computed_single_layer():
    # weight [3, 4] -> weight norm 5; gradient [.6, -.8] -> norm 1, mean -.1,
    # deviations from the mean +.7 and -.7 -> population std .7; max |g| .8.
    # SGD lr .5: update = .5 * [.6, -.8], norm .5 -> update/weight = .5 / 5 = .1.
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 4.0]]))
    model.weight.grad = torch.tensor([[0.6, -0.8]])
    stats = GradStats(model)
    stats.before_step()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    metrics = stats.after_step(step=7)
    expected = {"norm": 1.0, "mean": -0.1, "std": 0.7, "max_abs": 0.8, "weight_norm": 5.0, "update_ratio": 0.1}
    assert set(metrics) == {f"grad/weight/{k}" for k in expected}  # a root-owned parameter keeps its name
    for key, value in expected.items():
        assert metrics[f"grad/weight/{key}"] == pytest.approx(value, abs=1e-6), key
    assert stats.table_rows[0].step == 7 and stats.table_rows[0].layer == "weight"


def reference_stats(params_before, grads, params_after):
    """Slow reference: concatenate the layer's tensors and use torch's own reductions."""
    g = torch.cat([x.flatten() for x in grads]).double()
    w = torch.cat([x.flatten() for x in params_before]).double()
    w2 = torch.cat([x.flatten() for x in params_after]).double()
    return {
        "norm": g.norm().item(),
        "mean": g.mean().item(),
        "std": g.std(unbiased=False).item(),
        "max_abs": g.abs().max().item(),
        "weight_norm": w.norm().item(),
        "update_ratio": ((w2 - w).norm() / w.norm()).item(),
    }


class Wrapper(nn.Module):
    """Stands in for DDP: the model under ``module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_matches_reference_on_a_real_training_step_with_momentum_and_ddp_style_names():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(1, 3, 6, 6))  # materialise the lazy layer
    model = Wrapper(net)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    stats = GradStats(model, every=2)
    assert stats.layers == ["0", "2", "4"]
    for step in range(1, 5):
        optimizer.zero_grad()
        model.module(torch.randn(4, 3, 6, 6)).square().mean().backward()
        if stats.is_due(step):
            before = {
                name: [p.detach().clone() for p in layer.parameters()]
                for name, layer in (("0", net[0]), ("2", net[2]), ("4", net[4]))
            }
            grads = {name: [p.grad.clone() for p in net[int(name)].parameters()] for name in before}
            stats.before_step()
        optimizer.step()
        if stats.is_due(step):
            metrics = stats.after_step(step)
            assert len(metrics) == 3 * len(STAT_NAMES)
            for name in before:
                ref = reference_stats(before[name], grads[name], list(net[int(name)].parameters()))
                for stat, value in ref.items():
                    assert metrics[f"grad/{name}/{stat}"] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, stat)
    assert [row.step for row in stats.table_rows] == [2, 2, 2, 4, 4, 4]
    steps, layers, values = stats.norm_history()
    assert steps == [2, 4] and layers == ["0", "2", "4"] and values.shape == (3, 2)
    assert values[1, 1] == stats.table_rows[4].norm


def test_missing_gradient_counts_as_zero_and_frozen_layers_are_left_out():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model[2].requires_grad_(False)
    stats = GradStats(model)
    assert stats.layers == ["0", "1"]
    model(torch.ones(1, 2))  # no backward: every grad is None
    stats.before_step()
    metrics = stats.after_step(1)
    assert metrics["grad/0/norm"] == 0.0 and metrics["grad/1/max_abs"] == 0.0
    assert metrics["grad/0/update_ratio"] == 0.0  # no optimiser step either


def test_after_step_without_before_step_raises_and_no_parameters_rejected():
    stats = GradStats(nn.Linear(1, 1))
    with pytest.raises(RuntimeError, match="without before_step"):
        stats.after_step(1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradStats(nn.ReLU())
    with pytest.raises(ValueError, match="every must be >= 0"):
        GradStats(nn.Linear(1, 1), every=-1)
    assert not GradStats(nn.Linear(1, 1), every=0).is_due(0)


def test_layer_names():
    assert layer_name("module.backbone.conv4_3.weight") == "backbone.conv4_3"
    assert layer_name("module._orig_mod.heads.0.bias") == "heads.0"
    assert layer_name("scale") == "scale"


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=300))
def test_legal_metric_name_always_passes_mlflow_validation(name):
    legal = legal_metric_name(f"grad/{name}/norm")
    _validate_metric_name(legal)  # raises MlflowException if illegal
    assert len(legal) <= 250


def test_legal_metric_name_keeps_legal_names():
    for name in ("train/loss", "grad/backbone.conv1_1/update_ratio", "val/ap_small", "a b-c.d"):
        assert legal_metric_name(name) == name
    assert legal_metric_name("grad/x:y[0]/norm") == "grad/x_y_0_/norm"
    assert legal_metric_name("//a/./../b/") == "a/_/_/b"


def test_epoch_artifacts(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = GradStats(model, every=1)
    for step in range(1, 4):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        stats.before_step()
        optimizer.step()
        stats.after_step(step)
    paths = stats.write_epoch_artifacts(tmp_path / "art", epoch=2)
    assert [p.name for p in paths] == ["grad_stats_epoch002.csv", "grad_norm_heatmap_epoch002.png"]
    with open(paths[0]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3 and rows[0]["layer"] == "0" and rows[-1]["step"] == "3"
    np.testing.assert_allclose(float(rows[1]["norm"]), stats.table_rows[1].norm)
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
