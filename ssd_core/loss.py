"""The MultiBox loss: smooth-L1 localisation on positives + softmax cross-entropy with hard negative mining.

    L = (L_conf + alpha * L_loc) / N

with N the number of positive priors (the paper). ``cls_targets`` come from
:func:`ssd_core.matching.assign_targets`: 1..C-1 positive, 0 background, -1 ignored (neither positive
nor negative: matched only to a difficult box).

- L_loc: smooth-L1 (beta 1, as in Caffe) between predicted and target offsets, summed over the four
  coordinates of the positive priors only.
- L_conf: cross-entropy of the positives against their class, plus of the *mined* negatives against
  background. Per image, the negatives are ranked by their background cross-entropy and the highest
  ``neg_pos_ratio x (positives of that image)`` are kept (fewer if the image has fewer negatives).
  The ranking is a selection, so no gradient flows through it.
- N: over the whole batch (``normalize="batch"``, the paper), or per image and then averaged over the
  images (``normalize="per_image"``, what the seed's code does). N = 0 gives 0, never NaN: with no
  positive there is nothing to localise and no negative is mined. A caller that trains on a share of a
  larger batch passes that batch's divisor as ``denominator`` (a tensor: no host synchronisation).

Speed: no ``[B, P, C]`` autograd graph is built. Mining needs the background cross-entropy of every
prior, but only its order: :func:`background_rank_key` computes an order-preserving key once, without
gradient, and ``topk`` picks the negatives (a partial selection, not a full sort). The loss with
gradient is then computed only on the rows that count (positives and mined negatives, a few percent
of the priors), so the backward pass scatters a few thousand rows instead of a dense softmax over all
B x P priors. No Python loop runs over images or priors.

The same loss written one image and prior at a time, in float64, is
:func:`ssd_core.reference.reference_multibox_loss` (mining: :func:`ssd_core.reference.reference_hard_negative_mask`);
the tests check values and gradients against it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ssd_core.static_matching import wants_static_shapes

NORMALIZATIONS = ("batch", "per_image")
_LOG2_E = 1.0 / math.log(2.0)  # exp(x) == exp2(x * log2(e))


class LossTerms(NamedTuple):
    """MultiBox loss terms, each a 0-d tensor."""

    total: Tensor  # conf + alpha * loc, differentiable
    loc: Tensor  # normalised localisation term
    conf: Tensor  # normalised confidence term
    num_positives: Tensor  # int64 N, positives in the batch


def _mine(rank_key: Tensor, negative: Tensor, num_keep: Tensor, *, nonnegative: bool = False) -> tuple[Tensor, Tensor]:
    """Top ``num_keep[b]`` of ``rank_key`` among ``negative`` priors per image.

    Returns (top [B, K] prior indices, keep [B, K] bool), K = max(num_keep); ``top[b, :num_keep[b]]`` are
    the mined priors of image b, hardest first. ``num_keep`` must not exceed the negatives of each image.
    ``nonnegative`` promises keys >= +0.0, whose float32 bit patterns already sort like the values.
    """
    most = int(num_keep.max()) if num_keep.numel() else 0
    keep = torch.arange(most, device=rank_key.device) < num_keep[:, None]  # [B, K]
    if most == 0:
        return torch.zeros_like(keep, dtype=torch.long), keep
    # Non-negatives rank below every negative; the count bound keeps them out of the top num_keep.
    if rank_key.dtype == torch.float32:  # topk compares integers faster than floats on CPU
        as_int = rank_key.view(torch.int32) if nonnegative else _sortable_int32(rank_key)
        ranked = torch.where(negative, as_int, torch.iinfo(torch.int32).min)  # [B, P]
    else:
        ranked = torch.where(negative, rank_key, float("-inf"))  # [B, P]
    top = ranked.topk(most, dim=1, sorted=True).indices  # [B, K], hardest first
    return top, keep


def _sortable_int32(values: Tensor) -> Tensor:
    """float32 -> int32 in the same order (``a < b`` iff ``f(a) < f(b)``; -0.0 < +0.0), by the IEEE-754 bit trick:
    non-negative floats order like their bit patterns, negative ones in reverse, so flip their magnitude bits."""
    bits = values.contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def hard_negative_mask(
    conf_loss: Tensor, positive_mask: Tensor, neg_pos_ratio: float = 3, *, ignore_mask: Tensor | None = None
) -> Tensor:
    """Per image, the negatives with the highest confidence loss, at most ``neg_pos_ratio`` x its positives.

    Args:
        conf_loss: ``[B, P]`` loss of classifying each prior as background (only the order matters).
        positive_mask: ``[B, P]`` bool, the positive priors (never selected).
        neg_pos_ratio: negatives kept per positive; an image keeps ``min(floor(ratio * pos), negatives)``.
        ignore_mask: optional ``[B, P]`` bool, priors that are neither positive nor negative (never selected).

    Returns:
        ``[B, P]`` bool, True for the mined negatives. Computed without gradient. Among exactly equal losses
        the choice is up to ``torch.topk``; the count is always exact.

    Reference: :func:`ssd_core.reference.reference_hard_negative_mask` (a sort per image).
    """
    if conf_loss.ndim != 2 or positive_mask.shape != conf_loss.shape or positive_mask.dtype != torch.bool:
        raise ValueError(
            "hard_negative_mask: expected conf_loss [B, P] and a bool positive_mask of the same shape, "
            f"got {list(conf_loss.shape)} and {positive_mask.dtype} {list(positive_mask.shape)}"
        )
    if ignore_mask is not None and (ignore_mask.shape != conf_loss.shape or ignore_mask.dtype != torch.bool):
        raise ValueError(
            f"hard_negative_mask: ignore_mask must be bool {list(conf_loss.shape)}, "
            f"got {ignore_mask.dtype} {list(ignore_mask.shape)}"
        )
    _check_ratio("hard_negative_mask", neg_pos_ratio)
    with torch.no_grad():
        negative = ~positive_mask if ignore_mask is None else ~(positive_mask | ignore_mask)  # [B, P]
        num_keep = _num_negatives(positive_mask.sum(dim=1), negative.sum(dim=1), neg_pos_ratio)  # [B]
        top, keep = _mine(conf_loss.detach(), negative, num_keep)  # [B, K], [B, K]
        return torch.zeros_like(positive_mask).scatter_(1, top, keep)  # top is distinct per row


def _check_ratio(where: str, neg_pos_ratio: float) -> None:
    if not neg_pos_ratio >= 0:
        raise ValueError(f"{where}: neg_pos_ratio must be >= 0, got {neg_pos_ratio}")


def _num_negatives(num_positive: Tensor, num_negative: Tensor, neg_pos_ratio: float) -> Tensor:
    """``min(floor(ratio * positives), negatives)`` per image, int64 ``[B]``."""
    wanted = (
        num_positive * neg_pos_ratio
        if isinstance(neg_pos_ratio, int)
        else (torch.floor(num_positive * float(neg_pos_ratio)).long())
    )
    return torch.minimum(wanted, num_negative)


def background_rank_key(cls_logits: Tensor) -> Tensor:
    """A key that orders priors like their background cross-entropy: ``[B, P, C]`` -> ``[B, P]``, no gradient, >= +0.

    The key is ``exp(CE) = sum_c exp(x_c - x_0)`` (CE = ``-log softmax(x)[0]``), an increasing function of
    the loss, so ranking by it is ranking by the loss and no logarithm is needed. The exponentials are
    computed as ``exp2((x - x_0) * log2(e))``, whose vectorised CPU kernel is faster than ``exp``'s,
    and summed over classes by a matrix-vector product. The relative error is ~1e-6, so two negatives whose
    losses agree to that precision may swap ranks; the loss values themselves are computed exactly later.
    If a logit exceeds the background logit by more than ~88 the sum overflows and the exact
    ``log_softmax`` path (which returns the loss itself, same order) is used instead.
    """
    with torch.no_grad():
        logits = cls_logits.detach()
        if logits.dtype == torch.float32 and logits.numel():
            key = _exp_rank_key(logits)  # [B, P]
            if bool(torch.isfinite(key.sum())):  # one cheap reduction catches any inf or NaN
                return key
        return torch.log_softmax(logits, dim=-1)[..., 0].neg_().add_(0.0)  # + 0.0 turns -0.0 into +0.0


def _exp_rank_key(logits: Tensor) -> Tensor:
    """``sum_c exp(x_c - x_0)`` of float32 ``[B, P, C]`` logits -> ``[B, P]`` (see :func:`background_rank_key`)."""
    num_classes = logits.shape[-1]
    exp = torch.sub(logits, logits[..., :1]).mul_(_LOG2_E).exp2_()  # [B, P, C], exp(x_c - x_0)
    return torch.mv(exp.view(-1, num_classes), exp.new_ones(num_classes)).view(exp.shape[:-1])  # [B, P]


def _check_loss_inputs(loc_pred: Tensor, cls_logits: Tensor, loc_targets: Tensor, cls_targets: Tensor) -> None:
    where = "multibox_loss"
    if cls_logits.ndim != 3 or cls_logits.shape[-1] < 2:
        raise ValueError(f"{where}: cls_logits must be [B, P, C] with C >= 2, got {list(cls_logits.shape)}")
    batch, num_priors, _ = cls_logits.shape
    for name, tensor in (("loc_pred", loc_pred), ("loc_targets", loc_targets)):
        if tuple(tensor.shape) != (batch, num_priors, 4):
            raise ValueError(f"{where}: {name} must be [B, P, 4] = {[batch, num_priors, 4]}, got {list(tensor.shape)}")
    if tuple(cls_targets.shape) != (batch, num_priors):
        raise ValueError(f"{where}: cls_targets must be [B, P] = {[batch, num_priors]}, got {list(cls_targets.shape)}")
    if cls_targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"{where}: cls_targets must be int64 (-1 ignore, 0 background, 1..C-1), got {cls_targets.dtype}"
        )


def multibox_loss(
    loc_pred: Tensor,
    cls_logits: Tensor,
    loc_targets: Tensor,
    cls_targets: Tensor,
    *,
    neg_pos_ratio: float = 3,
    alpha: float = 1.0,
    normalize: str = "batch",
    denominator: Tensor | None = None,
    static_shapes: bool | None = None,
) -> LossTerms:
    """SSD's MultiBox loss (see the module docstring).

    Args:
        loc_pred: ``[B, P, 4]`` predicted offsets.
        cls_logits: ``[B, P, C]`` class logits, column 0 is background.
        loc_targets: ``[B, P, 4]`` target offsets (only positive rows are read).
        cls_targets: ``[B, P]`` int64: 1..C-1 positive, 0 background, -1 ignored.
        neg_pos_ratio: mined negatives per positive, per image.
        alpha: weight of the localisation term.
        normalize: ``"batch"`` divides both terms by N over the batch; ``"per_image"`` divides each image's
            terms by its own N (0 for an image without positives) and averages over the B images.
        denominator: optional 0-d tensor (> 0) replacing the batch's own divisor: ``"batch"`` divides the summed
            terms by it instead of by N, ``"per_image"`` the sum of the per-image normalised terms instead of
            by B. Data-parallel training passes a global count here (N or B over every rank's share, over
            the ranks), so the ranks' losses add up to the loss of the global batch.
        static_shapes: True: :func:`_multibox_loss_static`, dense over all B x P priors with no host read and
            no data-dependent shape (``torch.compile(fullgraph=True)``, CUDA graphs); False: the sparse rows
            below (fastest on a CPU); None (default): static on an accelerator and while compiling. The same
            loss up to float summation order, the same gradients to rounding.

    Returns:
        ``LossTerms(total, loc, conf, num_positives)``, 0-d tensors; ``total`` carries the gradient.

    Reference: :func:`ssd_core.reference.reference_multibox_loss` (one image and prior at a time).
    """
    _check_loss_inputs(loc_pred, cls_logits, loc_targets, cls_targets)
    _check_ratio("multibox_loss", neg_pos_ratio)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"multibox_loss: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    batch, num_priors, num_classes = cls_logits.shape
    cls_targets = cls_targets.long()
    if wants_static_shapes(cls_logits, static_shapes):
        return _multibox_loss_static(
            loc_pred,
            cls_logits,
            loc_targets,
            cls_targets,
            neg_pos_ratio=neg_pos_ratio,
            alpha=alpha,
            normalize=normalize,
            denominator=denominator,
        )

    # Which rows count, as flat indices b * P + p (sparse: a few percent of the B * P priors).
    with torch.no_grad():
        positive = cls_targets > 0  # [B, P]
        negative = cls_targets == 0  # [B, P]; ignored priors (-1) are in neither
        num_pos_per_image = positive.sum(dim=1)  # [B]
        num_keep = _num_negatives(num_pos_per_image, negative.sum(dim=1), neg_pos_ratio)  # [B]
        top, keep = _mine(background_rank_key(cls_logits), negative, num_keep, nonnegative=True)  # [B, K], [B, K]
        offsets = torch.arange(batch, device=top.device)[:, None] * num_priors  # [B, 1]
        neg_rows = (top + offsets)[keep]  # [sum num_keep]
        pos_rows = positive.view(-1).nonzero().squeeze(1)  # [N]
        conf_rows = torch.cat((pos_rows, neg_rows))  # [S]
        conf_labels = torch.cat((cls_targets.view(-1)[pos_rows], neg_rows.new_zeros(neg_rows.shape)))  # [S]

    loc_per_row = F.smooth_l1_loss(
        loc_pred.reshape(-1, 4).index_select(0, pos_rows),
        loc_targets.reshape(-1, 4).index_select(0, pos_rows).to(loc_pred.dtype),
        reduction="none",
    ).sum(dim=1)  # [N]
    conf_per_row = F.cross_entropy(
        cls_logits.reshape(-1, num_classes).index_select(0, conf_rows), conf_labels, reduction="none"
    )  # [S]

    num_positives = num_pos_per_image.sum()
    if normalize == "batch":
        divisor = num_positives.clamp(min=1) if denominator is None else denominator
        divisor = divisor.to(loc_per_row.dtype)
        loc = loc_per_row.sum() / divisor
        conf = conf_per_row.sum() / divisor
    else:
        per_image_n = num_pos_per_image.clamp(min=1).to(loc_per_row.dtype)  # [B]
        loc_per_image = loc_per_row.new_zeros(batch).index_add(0, pos_rows // num_priors, loc_per_row)  # [B]
        conf_per_image = conf_per_row.new_zeros(batch).index_add(0, conf_rows // num_priors, conf_per_row)  # [B]
        if denominator is None:
            loc = (loc_per_image / per_image_n).mean()
            conf = (conf_per_image / per_image_n).mean()
        else:
            loc = (loc_per_image / per_image_n).sum() / denominator.to(loc_per_row.dtype)
            conf = (conf_per_image / per_image_n).sum() / denominator.to(loc_per_row.dtype)
    return LossTerms(total=conf + alpha * loc, loc=loc, conf=conf, num_positives=num_positives)


def _multibox_loss_static(
    loc_pred: Tensor,
    cls_logits: Tensor,
    loc_targets: Tensor,
    cls_targets: Tensor,
    *,
    neg_pos_ratio: float,
    alpha: float,
    normalize: str,
    denominator: Tensor | None,
) -> LossTerms:
    """:func:`multibox_loss` over all ``B x P`` priors with masks instead of row lists (checked arguments).

    The same mining as the sparse form (same rank key, the exact log-softmax key whenever the fast one is not
    finite, picked by ``torch.where`` instead of a branch), but the negatives come from one sort per image
    (rank < ``num_keep``) instead of a ``topk`` of data-dependent size, and the cross-entropy is computed for
    every prior and masked, so the backward pass is dense ``[B, P, C]``: more arithmetic, no host read.
    """
    batch, num_priors, num_classes = cls_logits.shape
    with torch.no_grad():
        positive = cls_targets > 0  # [B, P]
        negative = cls_targets == 0  # [B, P]
        num_pos_per_image = positive.sum(dim=1)  # [B]
        num_keep = _num_negatives(num_pos_per_image, negative.sum(dim=1), neg_pos_ratio)  # [B]
        logits = cls_logits.detach()
        exact_key = torch.log_softmax(logits, dim=-1)[..., 0].neg().add(0.0)  # [B, P], >= +0.0
        if logits.dtype == torch.float32:
            fast_key = _exp_rank_key(logits)  # [B, P]
            key = torch.where(torch.isfinite(fast_key.sum()), fast_key, exact_key)
            ranked = torch.where(negative, key.view(torch.int32), torch.iinfo(torch.int32).min)  # [B, P]
        else:
            ranked = torch.where(negative, exact_key, float("-inf"))  # [B, P]
        order = torch.sort(ranked, dim=1, descending=True).indices  # [B, P], hardest first
        keep_sorted = torch.arange(num_priors, device=order.device) < num_keep[:, None]  # [B, P]
        mined = torch.zeros_like(positive).scatter(1, order, keep_sorted)  # [B, P]
        counted = positive | mined
        conf_labels = torch.where(positive, cls_targets, 0)

    loc_per_prior = F.smooth_l1_loss(loc_pred, loc_targets.to(loc_pred.dtype), reduction="none").sum(dim=2)  # [B, P]
    loc_per_prior = torch.where(positive, loc_per_prior, 0.0)
    conf_per_prior = F.cross_entropy(cls_logits.reshape(-1, num_classes), conf_labels.view(-1), reduction="none").view(
        batch, num_priors
    )
    conf_per_prior = torch.where(counted, conf_per_prior, 0.0)
    num_positives = num_pos_per_image.sum()
    if normalize == "batch":
        divisor = (num_positives.clamp(min=1) if denominator is None else denominator).to(loc_per_prior.dtype)
        loc = loc_per_prior.sum() / divisor
        conf = conf_per_prior.sum() / divisor
    else:
        per_image_n = num_pos_per_image.clamp(min=1).to(loc_per_prior.dtype)  # [B]
        loc_per_image = loc_per_prior.sum(dim=1) / per_image_n  # [B]
        conf_per_image = conf_per_prior.sum(dim=1) / per_image_n  # [B]
        if denominator is None:
            loc, conf = loc_per_image.mean(), conf_per_image.mean()
        else:
            loc = loc_per_image.sum() / denominator.to(loc_per_prior.dtype)
            conf = conf_per_image.sum() / denominator.to(loc_per_prior.dtype)
    return LossTerms(total=conf + alpha * loc, loc=loc, conf=conf, num_positives=num_positives)
