"""Target assignment with static shapes and no host read: the rules of :mod:`ssd_core.matching`, dense.

:func:`ssd_core.matching.assign_targets` packs the valid boxes of a batch (``nonzero``), searches only the
few candidate pairs and repeats the forced-match rounds ``while`` a box is pending: the fastest form on a
CPU, where reading a count back costs nothing. On an accelerator each of those reads stalls the device
until it has caught up, and a shape that depends on the data defeats ``torch.compile`` and CUDA graphs.
This module computes the same targets (the tests check them equal, bit for bit, on random batches and the
SSD300 priors) from tensors whose shapes depend only on ``[B, G]`` and ``P``:

- the IoU table ``[B, P, G]`` of every prior with every box slot, padding slots set to -1 (below every
  real IoU, so they never match);
- step 2 (threshold matches): each prior's best regular box (first slot on exact ties) by one reduction;
- step 1 (forced matches): every box's candidate priors are its best ``K = min(G, P)`` ones, ordered by IoU
  then prior index (one ``topk`` over exact int64 keys). An image has at most G boxes, so the best prior
  *not yet claimed* is always among them. The rounds run on ``[B, G, K]`` and ``[B, G, G]`` tensors; each
  round settles at least one pending box of every image that has one, so ``G`` rounds settle them all, and
  a round with nothing pending changes nothing. No round reads a count back: the loop is over a Python
  constant, and ``torch.compile`` generates the round once and calls it ``G`` times (a nested compile region).
- step 4 (difficult boxes) by reductions over the difficult slots.

Memory: the IoU table is ``B x P x G`` floats (32 x 8,732 x 64: 72 MB), its int64 keys twice that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssd_core.boxes import box_iou, cxcywh_to_xyxy
from ssd_core.coding import encode_boxes


def is_compiling() -> bool:
    """True while ``torch.compile`` traces (``torch.compiler.is_compiling``, torch >= 2.3; older: dynamo's)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return bool(torch._dynamo.is_compiling())  # pragma: no cover - torch < 2.3


def wants_static_shapes(tensor: Tensor, static_shapes: bool | None) -> bool:
    """``static_shapes`` if given, else: static unless running eagerly on a CPU (where a host read is free and
    the packed form is the fastest)."""
    if static_shapes is not None:
        return static_shapes
    return tensor.device.type != "cpu" or is_compiling()


def _first_index(values: Tensor, best: Tensor, dim: int) -> Tensor:
    """Lowest index along ``dim`` where ``values == best`` (``best`` keeps ``dim``): the tie rule of the
    packed implementation, written without relying on which index ``max`` reports."""
    size = values.shape[dim]
    shape = [1] * values.ndim
    shape[dim] = size
    index = torch.arange(size, device=values.device).view(shape)
    return torch.where(values == best, index, size).amin(dim=dim)


def _candidates(iou: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Each box's ``k`` best priors by (IoU descending, prior index ascending): ``iou [B, P, G]`` ->
    (prior ``[B, G, K]`` int64, IoU ``[B, G, K]``). float32 IoUs are >= 0 here, so their bit patterns order
    like the values; the int64 key puts them above the reversed prior index, which makes every key distinct
    and lets one partial ``topk`` do it. Other dtypes take a stable sort (the same order, slower)."""
    num_priors = iou.shape[1]
    by_box = iou.transpose(1, 2)  # [B, G, P]
    if iou.dtype != torch.float32:
        prior = torch.sort(by_box, dim=2, descending=True, stable=True).indices[..., :k]
        return prior, by_box.gather(2, prior)
    bits = by_box.clamp(min=0).contiguous().view(torch.int32).long()  # [B, G, P]
    reverse_index = num_priors - 1 - torch.arange(num_priors, device=iou.device)  # [P]
    top = torch.topk((bits << 32) | reverse_index, k, dim=2).values  # [B, G, K], distinct, best first
    prior = num_priors - 1 - (top & 0xFFFFFFFF)  # [B, G, K]
    return prior, by_box.gather(2, prior)


def _forced_round(
    prior: Tensor, cand_iou: Tensor, claimed: Tensor, forced: Tensor, pending: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One forced-match round: every pending box proposes its best free candidate and the proposals that no
    other pending box beats are granted. ``prior``/``cand_iou [B, G, K]``, ``claimed [B, P + 1]`` bool,
    ``forced [B, G]`` int64, ``pending [B, G]`` bool -> the new ``(claimed, forced, pending)``."""
    batch, slots, k = prior.shape
    num_priors = claimed.shape[1] - 1
    slot = torch.arange(slots, device=prior.device)
    h_later = slot[None, None, :] > slot[None, :, None]  # [1, G(g), G(h)]: box h comes after box g
    taken = claimed.gather(1, prior.reshape(batch, slots * k)).view(batch, slots, k)  # [B, G, K]
    first_free = torch.where(taken, k, torch.arange(k, device=prior.device)).amin(dim=2)  # [B, G], k: none
    pending = pending & (first_free < k)  # a box without a free prior gets none
    pick = first_free.clamp(max=k - 1)[..., None]
    proposal = prior.gather(2, pick).squeeze(2)  # [B, G]
    proposal_iou = cand_iou.gather(2, pick).squeeze(2)  # [B, G]
    # Box g wins its prior unless a pending box h proposing the same prior has a higher IoU, or the
    # same IoU and is later (the packed rounds' order).
    same = (proposal[:, :, None] == proposal[:, None, :]) & pending[:, None, :]  # [B, G(g), G(h)]
    iou_g, iou_h = proposal_iou[:, :, None], proposal_iou[:, None, :]
    beats = (iou_h > iou_g) | ((iou_h == iou_g) & h_later)  # [B, G, G], never on the diagonal
    wins = pending & ~(same & beats).any(dim=2)  # [B, G]
    forced = torch.where(wins, proposal, forced)
    claimed = claimed.scatter(1, torch.where(wins, proposal, num_priors), True)  # column P: never read
    return claimed, forced, pending & ~wins


def _compile_once(fn):
    """``torch.compiler.nested_compile_region(fn)`` (torch >= 2.8): ``torch.compile`` traces and generates the
    round once and calls it every round, instead of unrolling ``G`` copies (100 rounds made one 6.3 MB C++
    source that GCC 12 could not compile). Eager: ``fn`` itself. Older torch: ``fn`` (the rounds unroll)."""
    region = getattr(torch.compiler, "nested_compile_region", None)
    return region(fn) if region is not None else fn


_compiled_round = _compile_once(_forced_round)


def _forced_priors(iou: Tensor, claims: Tensor) -> Tensor:
    """Step 1 of :mod:`ssd_core.matching`: one distinct prior per claiming box, ``[B, G]`` int64, -1 for
    slots that do not claim and for boxes left without a free prior (an image with more boxes than priors).

    ``iou [B, P, G]`` (real IoUs >= 0), ``claims [B, G]`` bool (valid, not difficult).
    """
    batch, num_priors, slots = iou.shape
    prior, cand_iou = _candidates(iou, min(slots, num_priors))  # [B, G, K] each
    claimed = torch.zeros(batch, num_priors + 1, dtype=torch.bool, device=iou.device)  # column P: "no prior"
    forced = torch.full((batch, slots), -1, dtype=torch.long, device=iou.device)
    pending = claims.clone()  # [B, G]
    for _ in range(slots):  # each round settles >= 1 pending box per image; extra rounds change nothing
        claimed, forced, pending = _compiled_round(prior, cand_iou, claimed, forced, pending)
    return forced


def assign_targets_static(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_mask: Tensor,
    priors: Tensor,
    *,
    iou_threshold: float,
    variances: tuple[float, float],
    gt_difficult: Tensor | None,
    ignore_label: int,
) -> tuple[Tensor, Tensor]:
    """The targets of :func:`ssd_core.matching.assign_targets` (which checks the arguments and calls this on an
    accelerator or under ``torch.compile``): ``(loc_targets [B, P, 4], cls_targets [B, P] int64)``."""
    batch, slots = gt_mask.shape
    num_priors = priors.shape[0]
    device = gt_boxes.device
    priors = priors.to(device=device, dtype=gt_boxes.dtype)
    if slots == 0:
        return gt_boxes.new_zeros(batch, num_priors, 4), torch.zeros(batch, num_priors, dtype=torch.long, device=device)
    labels = gt_labels.long()
    difficult = gt_difficult & gt_mask if gt_difficult is not None else torch.zeros_like(gt_mask)
    regular = gt_mask & ~difficult  # [B, G]
    # The same float operations as the packed form's ``prior_gt_iou`` (== ``box_iou``): identical IoUs.
    iou = box_iou(cxcywh_to_xyxy(priors), gt_boxes.reshape(-1, 4)).view(num_priors, batch, slots).transpose(0, 1)
    iou = torch.where(gt_mask[:, None, :], iou, -1.0)  # [B, P, G]

    # Step 2: each prior's best regular box (first slot on ties), positive at or above the threshold.
    regular_iou = torch.where(regular[:, None, :], iou, -1.0)  # [B, P, G]
    best_regular = regular_iou.amax(dim=2, keepdim=True)  # [B, P, 1]
    box = _first_index(regular_iou, best_regular, dim=2)  # [B, P]
    positive = best_regular.squeeze(2) >= iou_threshold  # [B, P]
    # Step 1: forced matches overwrite.
    forced = _forced_priors(iou, regular)  # [B, G]
    slot = torch.arange(slots, device=device).expand(batch, slots)
    forced_box = torch.full((batch, num_priors + 1), -1, dtype=torch.long, device=device).scatter_reduce(
        1, torch.where(forced >= 0, forced, num_priors), slot, "amax"
    )[:, :num_priors]  # [B, P], distinct priors per image
    is_forced = forced_box >= 0
    box = torch.where(is_forced, forced_box, box.clamp(max=slots - 1))
    positive = positive | is_forced
    cls_targets = torch.where(positive, labels.gather(1, box), 0)  # [B, P]
    matched = gt_boxes.gather(1, box[..., None].expand(batch, num_priors, 4))  # [B, P, 4]
    loc_targets = torch.where(positive[..., None], encode_boxes(matched, priors, variances), 0.0)

    # Step 4: background priors that a difficult box would have matched are ignored.
    if gt_difficult is not None:
        difficult_iou = torch.where(difficult[:, None, :], iou, -1.0)  # [B, P, G]
        near = difficult_iou.amax(dim=2) >= iou_threshold  # [B, P]
        best_prior = _first_index(iou, iou.amax(dim=1, keepdim=True), dim=1)  # [B, G]
        marks = torch.zeros(batch, num_priors + 1, dtype=torch.bool, device=device).scatter(
            1, torch.where(difficult, best_prior, num_priors), True
        )[:, :num_priors]
        cls_targets = torch.where((near | marks) & (cls_targets == 0), ignore_label, cls_targets)
    return loc_targets, cls_targets
