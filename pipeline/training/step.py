"""One optimiser step of SSD training: forward, target assignment, loss, backward, the joint finite check, update.

``train_step`` needs no Ray and no process group: under DDP the model is the DDP wrapper (its backward
all-reduces the gradients) and ``sum_ranks`` is the one all-reduce of the step values; on one process both
are plain, so a unit test runs the very code every rank runs.

A step whose loss or gradient norm is non-finite on any rank is skipped on every rank: no optimiser
update, no loss-scaler update. Its forward still ran, so BatchNorm running statistics moved, as they do
for any batch the model sees in training mode.

No host read inside the step: target assignment and loss take their static-shape forms on an accelerator
(``ssd_core.static_matching``), and the skip is a 0-d device tensor handed to the fused optimiser as its
``found_inf`` (the mechanism ``GradScaler`` uses: the kernel leaves weights and momentum untouched when it
is 1) and masking the loss-scale update. The step returns a ``StepResult`` still on the device; the loop
reads results when it logs. The one exception: a step with an ``observer`` (gradient statistics, every
``tracking.grad_stats_every`` steps) reads the decision, since the observer reads the gradients anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from pipeline.config import TrainConfig
from pipeline.shards.loader import TrainBatch
from pipeline.training.guard import DeviceSkips, StepResult, SumOverRanks, reduce_step, sum_over_ranks
from pipeline.training.normalizer import global_denominator
from ssd_core.augment import normalize_images
from ssd_core.loss import LossTerms, multibox_loss
from ssd_core.matching import Targets, assign_targets

AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.precision`` -> the autocast dtype of the forward pass (None: autocast off)."""


class UpdateObserver(Protocol):
    """Looks at an optimiser update from both sides (per-layer gradient statistics, ``grad_stats``)."""

    def before_update(self, grad_norm: Tensor) -> None:
        """Gradients are final (unscaled, clipped); the weights are not yet updated. ``grad_norm`` (0-d, on the
        device): the total L2 norm of the gradients before clipping, the value ``train.grad_clip_norm`` caps."""

    def after_update(self) -> None:
        """The weights are updated."""


def step_targets(
    boxes: Tensor, labels: Tensor, mask: Tensor, difficult: Tensor, priors: Tensor, cfg: TrainConfig
) -> Targets:
    """Padded ground truth ``[B, G, ...]`` -> the targets of every prior (no gradient). Compiled by
    ``train.compile`` (``pipeline.training.compiled``) in the static-shape form."""
    with torch.no_grad():
        return assign_targets(boxes, labels, mask, priors, iou_threshold=cfg.iou_threshold, gt_difficult=difficult)


def step_loss(model: nn.Module, images: Tensor, targets: Targets, denominator: Tensor, cfg: TrainConfig) -> LossTerms:
    """uint8 images ``[B, 3, S, S]`` and their targets -> the MultiBox loss terms: normalisation, the forward
    pass under autocast, the loss divided by ``denominator`` (``normalizer.global_denominator``). What
    ``train.compile`` compiles with the model, one function so that inductor fuses across it."""
    images = normalize_images(images)  # [B, 3, S, S] float
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    amp_dtype = AMP_DTYPES[cfg.precision]
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(images)  # loc [B, P, 4], cls_logits [B, P, C], float32
    return multibox_loss(
        out.loc,
        out.cls_logits,
        targets.loc_targets,
        targets.cls_targets,
        neg_pos_ratio=cfg.neg_pos_ratio,
        normalize=cfg.loss_normalize,
        denominator=denominator,  # the global batch's N over W: every world size trains on the same gradient
    )


class StepFunctions(NamedTuple):
    """The step's two compilable parts (eager by default; ``compiled.build_step_functions``). The all-reduce of
    the loss normaliser runs between them, eagerly: a collective inside a compiled graph would break it."""

    targets: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, TrainConfig], Targets] = step_targets
    loss: Callable[[nn.Module, Tensor, Targets, Tensor, TrainConfig], LossTerms] = step_loss


EAGER = StepFunctions()


def train_step(
    model: nn.Module,
    batch: TrainBatch,
    priors: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    cfg: TrainConfig,
    scaler: torch.amp.GradScaler | None = None,
    sum_ranks: SumOverRanks = sum_over_ranks,
    observer: UpdateObserver | None = None,
    skips: DeviceSkips | None = None,
    functions: StepFunctions = EAGER,
    sum_counts: SumOverRanks = sum_over_ranks,
) -> StepResult:
    """Train ``model`` on one batch; returns the step's values over all ranks, on the device.

    Args:
        model: what to call on the images: the SSD, or its DDP wrapper. In training mode.
        batch: images uint8 ``[B, 3, S, S]``, boxes ``[B, G, 4]`` xyxy normalised with their labels,
            difficult flags and padding mask ``[B, G]``.
        priors: ``[P, 4]`` cxcywh on the training device (which is taken from them).
        optimizer: a fused SGD/AdamW (``optim.build_optimizer``: they take the skip as ``found_inf``) over the
            model's parameters; its gradients are zero (None) on entry and on return.
        cfg: reads ``iou_threshold``, ``neg_pos_ratio``, ``loss_normalize``, ``grad_clip_norm`` (0: measure
            the norm without clipping), ``precision`` and ``channels_last``.
        scaler: the fp16 loss scaler; None or disabled for fp32/bf16.
        sum_ranks: the step's collective (see ``guard.reduce_step``); every rank calls it exactly once.
        observer: called around the update, only when the step is not skipped (reads the decision).
        skips: the run's device-side skip count (``guard.DeviceSkips``), or None to decide on this step alone.
        functions: target assignment and loss, eager or compiled (``compiled.build_step_functions``).
        sum_counts: the collective that adds up the loss normaliser over the ranks before the backward pass
            (``normalizer.global_denominator``); every rank calls it exactly once.

    Returns:
        ``StepResult``: ``.read().finite`` is False when the step was skipped on every rank.
    """
    device = priors.device
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
    targets = functions.targets(
        batch.boxes.to(device, non_blocking=True),
        batch.labels.to(device, non_blocking=True),
        batch.mask.to(device, non_blocking=True),
        batch.difficult.to(device, non_blocking=True),
        priors,
        cfg,
    )
    denominator = global_denominator(targets.cls_targets, normalize=cfg.loss_normalize, sum_counts=sum_counts)
    terms = functions.loss(model, batch.images.to(device, non_blocking=True), targets, denominator, cfg)
    scaler.scale(terms.total).backward()  # DDP all-reduces the gradients here
    scaler.unscale_(optimizer)  # no-op unless fp16
    grad_norm = _clip_grad_norm(optimizer, cfg.grad_clip_norm)
    local_finite = torch.isfinite(terms.total.detach()) & torch.isfinite(grad_norm)
    result = reduce_step(
        local_finite=local_finite,
        loss=terms.total,
        loss_loc=terms.loc,
        loss_conf=terms.conf,
        positives=terms.num_positives,
        images=batch.images.shape[0],
        bad_samples=batch.num_bad,
        sum_ranks=sum_ranks,
    )
    skip = result.nonfinite.to(device) if skips is None else skips.decide(result.nonfinite.to(device))
    if observer is None:
        _masked_update(optimizer, scaler, skip)
    elif not bool(skip):  # the same decision on every rank; a gradient-statistics step reads it
        observer.before_update(grad_norm)
        _masked_update(optimizer, scaler, skip)
        observer.after_update()
    optimizer.zero_grad(set_to_none=True)
    return result


def _masked_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: Tensor) -> None:
    """The optimiser step and the loss-scale update, both left undone where the 0-d bool ``skip`` is True.

    The fused optimisers take ``found_inf`` (as under ``GradScaler.step``) and leave weights, momentum and
    step counts untouched when it is 1. SGD's momentum buffers must exist before the first step
    (``optim.build_optimizer`` makes them zero), or a skipped first step would leave them uninitialised.
    """
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        raise TypeError(f"train_step: the optimiser must be a fused one that takes found_inf, got {optimizer!r}")
    optimizer.found_inf = skip.to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    if scaler.is_enabled():  # GradScaler keeps its scale in tensors: restore them where skipped
        scale, growth = scaler._scale.clone(), scaler._growth_tracker.clone()
        scaler.update()
        scaler._scale.copy_(torch.where(skip, scale, scaler._scale))
        scaler._growth_tracker.copy_(torch.where(skip, growth, scaler._growth_tracker))


def _clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """The total L2 norm (0-d) of the optimiser's gradients before clipping; clipped to ``max_norm`` if > 0."""
    with_grad = [w for group in optimizer.param_groups for w in group["params"] if w.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    return torch.nn.utils.get_total_norm([w.grad for w in with_grad])
