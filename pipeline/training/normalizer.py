"""The MultiBox loss normaliser of the global batch, so that every world size trains on the same gradient.

The paper's loss is the sum of the per-prior terms over the whole batch divided by N, the batch's positive
priors. Each rank sees only its share of the global batch, and DDP *averages* the ranks' gradients, so
dividing by the rank's own N gives the mean of per-rank ratios ``(1/W) sum_r S_r / N_r``: another
objective at every world size W, and a rank with few positives weighs as much as one with many.

Instead every rank divides its sum by ``N_global / W``, one all-reduced count (``sum_counts``)::

    DDP mean over ranks of  grad(S_r) / (N_global / W)  =  grad(sum_r S_r) / N_global

which is the gradient of the global batch's loss, whatever W and however the batch is split
(``pipeline.shards.order``). ``normalize="per_image"`` (each image's terms over its own N, averaged over
images) works the same way with the global image count B_global in place of N_global. N_global = 0 (no
positive in the global batch) divides by 1, as the loss does for a single batch. The count stays a tensor
on the training device: the all-reduce adds no host synchronisation.

What W cannot change here, the models' batch norm does: ``ssd_tiny``'s BatchNorm normalises over each
rank's share (no SyncBatchNorm), so its forward pass, and hence its gradient, depends on the split. The
VGG presets have no batch norm.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.training.guard import SumOverRanks, sum_over_ranks


def global_denominator(cls_targets: Tensor, *, normalize: str, sum_counts: SumOverRanks = sum_over_ranks) -> Tensor:
    """The ``denominator`` for ``ssd_core.loss.multibox_loss`` on this rank: 0-d float32, on ``cls_targets``'
    device, ``max(N_global, 1) / W`` for ``"batch"`` or ``max(B_global, 1) / W`` for ``"per_image"``.

    Args:
        cls_targets: this rank's ``[B, P]`` int64 matching result (1..C-1 positive, 0 background, -1 ignored).
        normalize: ``train.loss_normalize``.
        sum_counts: the collective (``values [K] -> (sum over ranks [K], W)``); every rank calls it once.
    """
    if normalize == "batch":
        local = (cls_targets > 0).sum().to(torch.float64)  # N of this rank
    elif normalize == "per_image":
        local = torch.tensor(float(cls_targets.shape[0]), dtype=torch.float64, device=cls_targets.device)  # B
    else:
        raise ValueError(f"global_denominator: normalize must be 'batch' or 'per_image', got {normalize!r}")
    summed, world = sum_counts(local.reshape(1))  # [1], in float64: exact for any count below 2^53
    return (summed[0].clamp(min=1.0) / world).to(torch.float32)
