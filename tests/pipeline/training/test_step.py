"""``train_step`` alone, without Ray or a process group: what every rank runs for one batch."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.shards.loader import TrainBatch
from pipeline.training.faults import Faults, TrainHooks
from pipeline.training.optim import build_optimizer
from pipeline.training.step import train_step
from ssd_core.augment import normalize_images
from ssd_core.loss import multibox_loss
from ssd_core.matching import assign_targets
from ssd_core.model import SSD, build_ssd
from tests.pipeline.training.tiny import tiny_batch

NUM_CLASSES = 4  # background + 3
CFG = TrainConfig(lr=0.01, lr_reference_batch=2, batch_size=2, grad_clip_norm=10.0)


def _model() -> SSD:
    torch.manual_seed(0)
    return build_ssd("ssd_tiny", NUM_CLASSES).train()


def _parameters(model: SSD) -> dict[str, torch.Tensor]:
    return {name: w.detach().clone() for name, w in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _reference_step(model: SSD, batch: TrainBatch, priors: torch.Tensor, optimizer, cfg: TrainConfig) -> float:
    """The step written out plainly: normalise, match, forward, MultiBox loss, backward, clip, update."""
    targets = assign_targets(
        batch.boxes, batch.labels, batch.mask, priors, iou_threshold=cfg.iou_threshold, gt_difficult=batch.difficult
    )
    out = model(normalize_images(batch.images))
    loss = multibox_loss(
        out.loc,
        out.cls_logits,
        targets.loc_targets,
        targets.cls_targets,
        neg_pos_ratio=cfg.neg_pos_ratio,
        normalize=cfg.loss_normalize,
    ).total
    optimizer.zero_grad()
    loss.backward()
    # The total norm sums over the parameters in the optimiser's order, as the step does: another order
    # changes the last bit of the clip factor, and eight updates later the weights differ.
    in_optimizer_order = [w for group in optimizer.param_groups for w in group["params"]]
    torch.nn.utils.clip_grad_norm_(in_optimizer_order, cfg.grad_clip_norm)
    optimizer.step()
    return loss.item()


def test_the_step_equals_the_plain_computation_and_the_loss_falls():
    model = _model()
    reference = copy.deepcopy(model)
    batch, priors = tiny_batch(model.image_size), model.priors()  # priors [P, 4] cxcywh
    optimizer, reference_optimizer = build_optimizer(model, CFG), build_optimizer(reference, CFG)
    losses = []
    for _ in range(8):
        stats = train_step(model, batch, priors, optimizer, cfg=CFG)
        expected = _reference_step(reference, batch, priors, reference_optimizer, CFG)
        assert stats.finite and stats.loss == expected
        assert (stats.images, stats.bad_samples) == (2.0, 1.0)
        assert stats.positives > 0 and stats.loss == pytest.approx(stats.loss_loc + stats.loss_conf, rel=1e-5)
        losses.append(stats.loss)
    assert _same(_parameters(model), _parameters(reference))  # bit for bit, after eight updates
    assert all(w.grad is None for w in model.parameters())  # the step leaves no gradient behind
    # One batch learnt by heart: with lr 0.01 the loss falls from ~11.5 to ~4.2 in eight steps; demand a third off.
    assert losses[-1] < 0.67 * losses[0], losses


def test_a_nan_on_this_rank_skips_the_update():
    model = _model()
    batch, priors = tiny_batch(model.image_size), model.priors()
    optimizer = build_optimizer(model, CFG)
    train_step(model, batch, priors, optimizer, cfg=CFG)  # momentum buffers exist from here on
    weights, momentum = _parameters(model), copy.deepcopy(optimizer.state_dict()["state"])
    Faults(nan=({"rank": 0, "steps": [1]},)).before_step(0, 1, model)  # the next forward returns NaN
    recorder = _Recorder(model)
    stats = train_step(model, batch, priors, optimizer, cfg=CFG, observer=recorder)
    assert not stats.finite and stats.loss != stats.loss  # NaN
    assert _same(_parameters(model), weights)
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[i]["momentum_buffer"], momentum[i]["momentum_buffer"]) for i in momentum)
    assert recorder.calls == [] and all(w.grad is None for w in model.parameters())
    assert train_step(model, batch, priors, optimizer, cfg=CFG).finite  # the fault was for one step only
    assert not _same(_parameters(model), weights)


def test_a_nan_on_another_rank_skips_the_update_here_too():
    """The collective is injected: a second rank whose values say "not finite" makes this rank skip."""
    model = _model()
    batch, priors = tiny_batch(model.image_size), model.priors()
    optimizer = build_optimizer(model, CFG)
    weights = _parameters(model)
    # The other rank's [7] values: not-finite flag, loss, loc, conf, positives, images, bad samples.
    other = torch.tensor([1.0, float("nan"), float("nan"), float("nan"), 3.0, 2.0, 0.0], dtype=torch.float64)
    stats = train_step(model, batch, priors, optimizer, cfg=CFG, sum_ranks=lambda values: (values + other, 2))
    assert not stats.finite and stats.images == 4.0
    assert _same(_parameters(model), weights)


def test_the_collective_averages_losses_and_sums_counts():
    """A finite second rank: losses are the mean of the two ranks', positives, images and bad samples sums."""
    model = _model()
    alone = copy.deepcopy(model)
    batch, priors = tiny_batch(model.image_size), model.priors()
    local = train_step(alone, batch, priors, build_optimizer(alone, CFG), cfg=CFG)
    other = torch.tensor([0.0, 2.0, 0.5, 1.5, 3.0, 2.0, 4.0], dtype=torch.float64)  # as above, finite
    both = train_step(model, batch, priors, build_optimizer(model, CFG), cfg=CFG, sum_ranks=lambda v: (v + other, 2))
    assert both.finite and _same(_parameters(model), _parameters(alone))  # the update uses the local gradients
    assert both.loss == pytest.approx((local.loss + 2.0) / 2)
    assert (both.loss_loc, both.loss_conf) == pytest.approx(((local.loss_loc + 0.5) / 2, (local.loss_conf + 1.5) / 2))
    assert (both.positives, both.images, both.bad_samples) == (local.positives + 3.0, 4.0, 5.0)


class _Recorder:
    """An ``UpdateObserver`` that notes the model's first weight at each call."""

    def __init__(self, model: SSD) -> None:
        self.model, self.calls = model, []

    def before_update(self) -> None:
        self.calls.append(("before", _first_weight(self.model)))

    def after_update(self) -> None:
        self.calls.append(("after", _first_weight(self.model)))


def _first_weight(model: SSD) -> torch.Tensor:
    return next(model.parameters()).detach().clone()


def test_the_observer_sees_the_weights_before_and_after_the_update():
    model = _model()
    batch, priors = tiny_batch(model.image_size), model.priors()
    recorder, initial = _Recorder(model), _first_weight(model)
    train_step(model, batch, priors, build_optimizer(model, CFG), cfg=CFG, observer=recorder)
    calls = recorder.calls
    assert [name for name, _ in calls] == ["before", "after"]
    assert torch.equal(calls[0][1], initial) and not torch.equal(calls[1][1], initial)
    assert torch.equal(calls[1][1], _first_weight(model))


def test_the_default_hooks_do_nothing():
    model = _model()
    reference = copy.deepcopy(model)
    batch, priors = tiny_batch(model.image_size), model.priors()
    hooks = TrainHooks()
    hooks.before_step(0, 0, model)
    stats = train_step(model, batch, priors, build_optimizer(model, CFG), cfg=CFG)
    hooks.after_step(0, 1, model, stats)
    assert hooks.before_checkpoint_rename(0, 1) is None
    expected = train_step(reference, batch, priors, build_optimizer(reference, CFG), cfg=CFG)
    assert stats == expected and _same(_parameters(model), _parameters(reference))
