"""``train_step`` alone, without Ray or a process group: what every rank runs for one batch."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.shards.loader import TrainBatch
from pipeline.training.faults import Faults, TrainHooks
from pipeline.training.guard import DeviceSkips
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
        stats = train_step(model, batch, priors, optimizer, cfg=CFG).read()
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
    stats = train_step(model, batch, priors, optimizer, cfg=CFG, observer=recorder).read()
    assert not stats.finite and stats.loss != stats.loss  # NaN
    assert _same(_parameters(model), weights)
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[i]["momentum_buffer"], momentum[i]["momentum_buffer"]) for i in momentum)
    assert recorder.calls == [] and all(w.grad is None for w in model.parameters())
    assert train_step(model, batch, priors, optimizer, cfg=CFG).read().finite  # the fault was for one step only
    assert not _same(_parameters(model), weights)


def test_a_nan_on_another_rank_skips_the_update_here_too():
    """The collective is injected: a second rank whose values say "not finite" makes this rank skip."""
    model = _model()
    batch, priors = tiny_batch(model.image_size), model.priors()
    optimizer = build_optimizer(model, CFG)
    weights = _parameters(model)
    # The other rank's [7] values: not-finite flag, loss, loc, conf, positives, images, bad samples.
    other = torch.tensor([1.0, float("nan"), float("nan"), float("nan"), 3.0, 2.0, 0.0], dtype=torch.float64)
    stats = train_step(model, batch, priors, optimizer, cfg=CFG, sum_ranks=lambda values: (values + other, 2)).read()
    assert not stats.finite and stats.images == 4.0
    assert _same(_parameters(model), weights)


def test_the_collective_averages_losses_and_sums_counts():
    """A finite second rank: losses are the mean of the two ranks', positives, images and bad samples sums."""
    model = _model()
    alone = copy.deepcopy(model)
    batch, priors = tiny_batch(model.image_size), model.priors()
    local = train_step(alone, batch, priors, build_optimizer(alone, CFG), cfg=CFG).read()
    other = torch.tensor([0.0, 2.0, 0.5, 1.5, 3.0, 2.0, 4.0], dtype=torch.float64)  # as above, finite
    both = train_step(
        model, batch, priors, build_optimizer(model, CFG), cfg=CFG, sum_ranks=lambda v: (v + other, 2)
    ).read()
    assert both.finite and _same(_parameters(model), _parameters(alone))  # the update uses the local gradients
    assert both.loss == pytest.approx((local.loss + 2.0) / 2)
    assert (both.loss_loc, both.loss_conf) == pytest.approx(((local.loss_loc + 0.5) / 2, (local.loss_conf + 1.5) / 2))
    assert (both.positives, both.images, both.bad_samples) == (local.positives + 3.0, 4.0, 5.0)


class _Recorder:
    """An ``UpdateObserver`` that notes the model's first weight at each call, and the norms before and after
    clipping (the one handed over, the one of the gradients it sees)."""

    def __init__(self, model: SSD) -> None:
        self.model, self.calls, self.norms = model, [], None

    def before_update(self, grad_norm: torch.Tensor) -> None:
        self.calls.append(("before", _first_weight(self.model)))
        applied = torch.nn.utils.get_total_norm([w.grad for w in self.model.parameters() if w.grad is not None])
        self.norms = (grad_norm.item(), applied.item())

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


def test_the_observer_gets_the_gradient_norm_before_clipping():
    # The reference: the same model and batch through the plain step without clipping, torch's own total norm.
    model = _model()
    batch, priors = tiny_batch(model.image_size), model.priors()
    plain = copy.deepcopy(model)
    _reference_step(
        plain, batch, priors, torch.optim.SGD(plain.parameters(), lr=0.0), dataclasses.replace(CFG, grad_clip_norm=1e9)
    )
    unclipped = torch.nn.utils.get_total_norm([w.grad for w in plain.parameters()]).item()
    cfg = dataclasses.replace(CFG, grad_clip_norm=unclipped / 4)  # well below: the step clips
    clip = cfg.grad_clip_norm
    recorder = _Recorder(model)
    train_step(model, batch, priors, build_optimizer(model, cfg), cfg=cfg, observer=recorder)
    handed, applied = recorder.norms
    assert handed == pytest.approx(unclipped, rel=1e-5) and applied == pytest.approx(clip, rel=1e-5)


def test_the_default_hooks_do_nothing():
    model = _model()
    reference = copy.deepcopy(model)
    batch, priors = tiny_batch(model.image_size), model.priors()
    hooks = TrainHooks()
    hooks.before_step(0, 0, model)
    stats = train_step(model, batch, priors, build_optimizer(model, CFG), cfg=CFG).read()
    hooks.after_step(0, 1, model, stats)
    assert hooks.before_checkpoint_rename(0, 1) is None
    expected = train_step(reference, batch, priors, build_optimizer(reference, CFG), cfg=CFG).read()
    assert stats == expected and _same(_parameters(model), _parameters(reference))


def test_the_first_step_equals_torchs_own_momentum_initialisation():
    """``build_optimizer`` makes SGD's momentum buffers zero up front (so that a skipped first step cannot leave
    them uninitialised); 0 * momentum + g == g, so the updates are bit-identical to torch's lazy start."""
    model, reference = _model(), _model()
    batch, priors = tiny_batch(model.image_size), model.priors()
    optimizer, lazy = build_optimizer(model, CFG), build_optimizer(reference, CFG)
    assert all(torch.equal(s["momentum_buffer"], torch.zeros_like(p)) for p, s in optimizer.state.items())
    lazy.state.clear()  # what torch.optim.SGD starts with
    for _ in range(3):
        train_step(model, batch, priors, optimizer, cfg=CFG)
        _reference_step(reference, batch, priors, lazy, CFG)
    assert _same(_parameters(model), _parameters(reference))


def test_a_nan_at_the_very_first_step_leaves_weights_and_zero_momentum():
    model, reference = _model(), _model()
    batch, priors = tiny_batch(model.image_size), model.priors()
    optimizer, lazy = build_optimizer(model, CFG), build_optimizer(reference, CFG)
    lazy.state.clear()
    weights = _parameters(model)
    Faults(nan=({"rank": 0, "steps": [0]},)).before_step(0, 0, model)
    assert not train_step(model, batch, priors, optimizer, cfg=CFG).read().finite
    assert _same(_parameters(model), weights)
    assert all(not s["momentum_buffer"].any() for s in optimizer.state.values())
    train_step(model, batch, priors, optimizer, cfg=CFG)  # the first real update: as from a fresh start
    _reference_step(reference, batch, priors, lazy, CFG)
    assert _same(_parameters(model), _parameters(reference))


def test_a_skipped_step_leaves_the_loss_scale_alone():
    """fp16's ``GradScaler`` (enabled here on CPU to exercise it): a skipped step neither grows nor shrinks the
    scale, nor counts towards growth; a finite one counts."""
    model = _model()
    batch, priors = tiny_batch(model.image_size), model.priors()
    optimizer, scaler = build_optimizer(model, CFG), torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    train_step(model, batch, priors, optimizer, cfg=CFG, scaler=scaler)
    assert (scaler.get_scale(), scaler._growth_tracker.item()) == (256.0, 1)
    Faults(nan=({"rank": 0, "steps": [1]},)).before_step(0, 1, model)
    weights = _parameters(model)
    assert not train_step(model, batch, priors, optimizer, cfg=CFG, scaler=scaler).read().finite
    assert (scaler.get_scale(), scaler._growth_tracker.item()) == (256.0, 1) and _same(_parameters(model), weights)
    assert train_step(model, batch, priors, optimizer, cfg=CFG, scaler=scaler).read().finite
    assert scaler.get_scale() == 512.0  # the second finite step in a row grows it


def test_device_skips_halt_once_the_guard_trips():
    skips = DeviceSkips(max_consecutive=2, consecutive=0, device=torch.device("cpu"))
    nan, ok = torch.tensor(True), torch.tensor(False)
    decisions = [bool(skips.decide(flag)) for flag in (nan, ok, nan, nan, ok, ok)]
    # reset by a finite step; two in a row trip it; from then on every step is skipped until the host stops
    assert decisions == [True, False, True, True, True, True]
    resumed = DeviceSkips(max_consecutive=2, consecutive=1, device=torch.device("cpu"))
    assert [bool(resumed.decide(flag)) for flag in (nan, ok)] == [True, True]


_HOST_READS = ("__bool__", "item", "tolist", "cpu", "numpy", "__int__", "__float__", "__index__", "nonzero")


def test_the_step_reads_nothing_back_from_the_device(monkeypatch):
    """With the static forms of matching and loss (what an accelerator runs), a whole step, update included,
    runs with every host-read method of ``Tensor`` raising. (On CUDA, ``torch.cuda.set_sync_debug_mode`` says
    the same; the packed CPU forms would fail here, which is why the CPU default keeps them off the device.)"""
    import ssd_core.loss
    import ssd_core.matching

    model = _model()
    batch, priors = tiny_batch(model.image_size), model.priors()
    optimizer, weights = build_optimizer(model, CFG), _parameters(model)
    skips = DeviceSkips(max_consecutive=3, consecutive=0, device=torch.device("cpu"))
    monkeypatch.setattr(ssd_core.matching, "wants_static_shapes", lambda tensor, static: True)
    monkeypatch.setattr(ssd_core.loss, "wants_static_shapes", lambda tensor, static: True)
    with monkeypatch.context() as patched:
        for name in _HOST_READS:
            patched.setattr(torch.Tensor, name, _refuse(name))
        result = train_step(model, batch, priors, optimizer, cfg=CFG, skips=skips)
    assert result.read().finite and not _same(_parameters(model), weights)

    with monkeypatch.context() as patched:  # the check can fail: the packed forms read counts back
        monkeypatch.setattr(ssd_core.matching, "wants_static_shapes", lambda tensor, static: False)
        for name in _HOST_READS:
            patched.setattr(torch.Tensor, name, _refuse(name))
        with pytest.raises(AssertionError, match="host read"):
            train_step(model, batch, priors, optimizer, cfg=CFG, skips=skips)


def _refuse(name: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"host read inside the step: Tensor.{name}")

    return refuse
