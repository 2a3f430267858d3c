"""SGD set-up, learning-rate scaling and the warm-up + decay schedule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipeline.config import TrainConfig
from pipeline.training.optim import (
    WARMUP_START_FACTOR,
    build_optimizer,
    build_scheduler,
    check_schedule,
    lr_factor,
    scaled_lr,
)


def _cfg(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **changes)


def test_linear_scaling_rule():
    # 32 images per step is the reference: 2 workers x 32 images is twice the batch, so twice the rate.
    assert scaled_lr(1e-3, 64, 32) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 8, 32) == pytest.approx(2.5e-4)
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        scaled_lr(1e-3, 0, 32)


def test_warmup_then_cosine_by_hand():
    cfg = _cfg(max_steps=110, warmup_steps=10, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(WARMUP_START_FACTOR)
    # halfway through warm-up: 0.001 + 0.999 * 5/10
    assert lr_factor(5, cfg) == pytest.approx(0.5005)
    assert lr_factor(10, cfg) == pytest.approx(1.0)  # cos(0)
    assert lr_factor(60, cfg) == pytest.approx(0.5)  # half of the 100 decay steps: (1 + cos(pi/2)) / 2
    assert lr_factor(110, cfg) == pytest.approx(0.0, abs=1e-12)  # (1 + cos(pi)) / 2


def test_warmup_then_multistep_by_hand():
    cfg = _cfg(max_steps=40, warmup_steps=5, schedule="multistep", milestones=[20, 30], gamma=0.1)
    assert [lr_factor(s, cfg) for s in (5, 19)] == [1.0, 1.0]
    assert lr_factor(20, cfg) == pytest.approx(0.1)
    assert lr_factor(29, cfg) == pytest.approx(0.1)
    assert lr_factor(30, cfg) == pytest.approx(0.01)


def test_no_warmup_starts_at_the_full_rate():
    assert lr_factor(0, _cfg(warmup_steps=0, max_steps=10)) == pytest.approx(1.0)


@pytest.mark.parametrize("milestones", [[30, 20], [20, 20], [0], [41]])
def test_bad_milestones_are_refused_with_the_key(milestones):
    with pytest.raises(ValueError, match=r"train\.milestones: expected strictly increasing steps in 1\.\.40"):
        check_schedule(_cfg(max_steps=40, schedule="multistep", milestones=milestones))


@settings(max_examples=25, deadline=None)
@given(
    warmup=st.integers(0, 20),
    max_steps=st.integers(1, 60),
    schedule=st.sampled_from(["cosine", "multistep"]),
    batch=st.integers(1, 64),
)
def test_the_scheduler_follows_lr_factor_step_by_step(warmup, max_steps, schedule, batch):
    milestones = sorted({m for m in (max_steps // 2, max_steps) if m > 0})
    cfg = _cfg(
        warmup_steps=warmup,
        max_steps=max_steps,
        schedule=schedule,
        milestones=milestones,
        batch_size=batch,
        lr=0.02,
        lr_reference_batch=8,
    )
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    peak = 0.02 * batch / 8  # train.batch_size is the global batch, whatever the number of workers
    for step in range(max_steps):
        for group in optimizer.param_groups:
            assert math.isclose(group["lr"], peak * lr_factor(step, cfg), rel_tol=1e-9, abs_tol=1e-15)
        optimizer.step()
        scheduler.step()


def test_biases_and_norm_scales_are_not_decayed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, bias=False))
    optimizer = build_optimizer(model, _cfg(weight_decay=5e-4, momentum=0.9))
    decay, no_decay = optimizer.param_groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (5e-4, 0.0)
    assert decay["momentum"] == no_decay["momentum"] == 0.9
    # One SGD step on the decayed weight: grad 0 -> the update is lr * wd * w (momentum buffer starts at it).
    w0 = model[2].weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    lr = decay["lr"]
    assert torch.allclose(model[2].weight, w0 - lr * 5e-4 * w0)


def test_adamw_decays_weights_decoupled_and_leaves_biases_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    cfg = _cfg(optimizer="adamw", weight_decay=0.05, momentum=0.9, lr=2e-3, lr_reference_batch=32, batch_size=32)
    optimizer = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["betas"] == (0.9, 0.999)
    assert decay["lr"] == pytest.approx(2e-3)  # the global batch is the reference batch of 32
    # With zero gradients Adam's update m / (sqrt(v) + eps) is 0, so only the decoupled decay moves the
    # weights: w <- w (1 - lr wd); biases and the BatchNorm scale are not decayed and stay put.
    weight0, bias0, scale0 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[1].weight))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.allclose(model[0].weight, weight0 * (1 - 2e-3 * 0.05))
    assert torch.equal(model[0].bias, bias0) and torch.equal(model[1].weight, scale0)


def test_adamw_step_matches_the_textbook_update():
    # First Adam step with bias correction: m_hat = g, v_hat = g^2, so w <- w - lr g / (|g| + eps) = w - lr sign(g)
    # (for |g| >> eps), after the decoupled decay w (1 - lr wd).
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    optimizer = build_optimizer(
        model, _cfg(optimizer="adamw", lr=0.1, weight_decay=0.5, lr_reference_batch=32, batch_size=32)
    )
    model.weight.grad = torch.tensor([[3.0, -0.5]])
    optimizer.step()
    expected = torch.tensor([[1.0, -2.0]]) * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([[1.0, -1.0]])
    assert torch.allclose(model.weight, expected, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_parameters_stay_until_the_unfreeze_step_then_train(optimizer):
    """train.freeze=["0."]: the first conv's weight and bias keep their values, weight decay and momentum
    included, for steps 0 and 1; from train.unfreeze_at_step=2 on they follow the schedule like the rest."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))
    cfg = _cfg(optimizer=optimizer, freeze=["0."], unfreeze_at_step=2, warmup_steps=0, weight_decay=0.1, max_steps=10)
    opt = build_optimizer(model, cfg)
    scheduler = build_scheduler(opt, cfg)
    frozen = [g for g in opt.param_groups if g["frozen"]]
    assert sum(len(g["params"]) for g in frozen) == 2 and len(opt.param_groups) == 4
    first, second = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    for step in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        scheduler.step()
        moved = not torch.equal(model[0].weight, first)
        assert moved == (step >= 2), step  # step 2 is the first at a non-zero rate
        assert not torch.equal(model[1].weight, second)
        second = model[1].weight.detach().clone()
    assert [g["lr"] > 0 for g in opt.param_groups] == [True, True, True, True]


def test_without_freeze_the_groups_are_as_before():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert len(build_optimizer(model, _cfg()).param_groups) == 2
    # unfreeze_at_step 0 with a prefix: frozen for the whole run
    cfg = _cfg(freeze=["0.weight"], warmup_steps=0)
    opt = build_optimizer(model, cfg)
    scheduler = build_scheduler(opt, cfg)
    for _ in range(5):
        opt.step()  # no gradients: nothing moves
        scheduler.step()
    assert [g["lr"] == 0 for g in opt.param_groups] == [False, False, True]
