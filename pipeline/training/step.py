"""One optimiser step of SSD training: forward, target assignment, loss, backward, the joint finite check, update.

``train_step`` needs no Ray and no process group: under DDP the model is the DDP wrapper (its backward
all-reduces the gradients) and ``sum_ranks`` is the one all-reduce of the step values; on one process both
are plain, so a unit test runs the very code every rank runs.

A step whose loss or gradient norm is non-finite on any rank is skipped on every rank: no optimiser
update, no loss-scaler update. Its forward still ran, so BatchNorm running statistics moved, as they do
for any batch the model sees in training mode.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from pipeline.config import TrainConfig
from pipeline.shards.loader import TrainBatch
from pipeline.training.guard import StepStats, SumOverRanks, reduce_step, sum_over_ranks
from pipeline.training.normalizer import global_denominator
from ssd_core.augment import normalize_images
from ssd_core.loss import multibox_loss
from ssd_core.matching import assign_targets

AMP_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.precision`` -> the autocast dtype of the forward pass (None: autocast off)."""


class UpdateObserver(Protocol):
    """Looks at an optimiser update from both sides (per-layer gradient statistics, ``grad_stats``)."""

    def before_update(self) -> None:
        """Gradients are final (unscaled, clipped); the weights are not yet updated."""

    def after_update(self) -> None:
        """The weights are updated."""


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
    sum_counts: SumOverRanks = sum_over_ranks,
) -> StepStats:
    """Train ``model`` on one batch; returns the step's values over all ranks.

    Args:
        model: what to call on the images: the SSD, or its DDP wrapper. In training mode.
        batch: images uint8 ``[B, 3, S, S]``, boxes ``[B, G, 4]`` xyxy normalised with their labels,
            difficult flags and padding mask ``[B, G]``.
        priors: ``[P, 4]`` cxcywh on the training device (which is taken from them).
        optimizer: holds the model's parameters; its gradients are zero (None) on entry and on return.
        cfg: reads ``iou_threshold``, ``neg_pos_ratio``, ``loss_normalize``, ``grad_clip_norm`` (0: measure
            the norm without clipping), ``precision`` and ``channels_last``.
        scaler: the fp16 loss scaler; None or disabled for fp32/bf16.
        sum_ranks: the step's collective (see ``guard.reduce_step``); every rank calls it exactly once.
        observer: called around the update, only when the step is not skipped.
        sum_counts: the collective that adds up the loss normaliser over the ranks before the backward pass
            (``normalizer.global_denominator``); every rank calls it exactly once.

    Returns:
        ``StepStats``: ``finite`` is False when the step was skipped on every rank.
    """
    device = priors.device
    scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
    images = normalize_images(batch.images.to(device, non_blocking=True))  # [B, 3, S, S] float
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        targets = assign_targets(
            batch.boxes.to(device),
            batch.labels.to(device),
            batch.mask.to(device),
            priors,
            iou_threshold=cfg.iou_threshold,
            gt_difficult=batch.difficult.to(device),
        )
        denominator = global_denominator(targets.cls_targets, normalize=cfg.loss_normalize, sum_counts=sum_counts)
    amp_dtype = AMP_DTYPES[cfg.precision]
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(images)  # loc [B, P, 4], cls_logits [B, P, C], float32
    terms = multibox_loss(
        out.loc,
        out.cls_logits,
        targets.loc_targets,
        targets.cls_targets,
        neg_pos_ratio=cfg.neg_pos_ratio,
        normalize=cfg.loss_normalize,
        denominator=denominator,  # the global batch's N over W: every world size trains on the same gradient
    )
    scaler.scale(terms.total).backward()  # DDP all-reduces the gradients here
    scaler.unscale_(optimizer)  # no-op unless fp16
    grad_norm = _clip_grad_norm(optimizer, cfg.grad_clip_norm)
    local_finite = torch.isfinite(terms.total.detach()) & torch.isfinite(grad_norm)
    stats = reduce_step(
        local_finite=local_finite,
        loss=terms.total,
        loss_loc=terms.loc,
        loss_conf=terms.conf,
        positives=terms.num_positives,
        images=batch.images.shape[0],
        bad_samples=batch.num_bad,
        sum_ranks=sum_ranks,
    )
    if stats.finite:  # the same decision on every rank
        if observer is not None:
            observer.before_update()
        scaler.step(optimizer)
        scaler.update()
        if observer is not None:
            observer.after_update()
    optimizer.zero_grad(set_to_none=True)
    return stats


def _clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """The total L2 norm (0-d) of the optimiser's gradients before clipping; clipped to ``max_norm`` if > 0."""
    with_grad = [w for group in optimizer.param_groups for w in group["params"] if w.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    return torch.nn.utils.get_total_norm([w.grad for w in with_grad])
