"""Target assignment: which prior learns which ground-truth box (SSD's "matching strategy").

For every image of a padded batch at once (no Python loop over images or priors):

1. **Forced matches.** Every valid, non-difficult ground-truth box claims the prior it overlaps best,
   even below the threshold (the paper: "we begin by matching each ground truth box to the default
   box with the best jaccard overlap"), so no box goes unlearned. Two boxes may want the same prior;
   the rule is: the box with the higher IoU keeps it (on an exact tie the later box, as in the
   original code), and each losing box claims its best prior *not yet claimed*, round after round,
   until every box holds its own prior. So every valid box gets at least one positive prior whenever
   the image has at least as many priors as boxes. (The original code let the later box win and
   the earlier one could end with no positive at all.)
2. **Threshold matches.** Every other prior whose best IoU with a box is ``>= iou_threshold`` is
   positive for that box (its best box; an exact IoU tie goes to the earlier box).
3. Everything else is background (class 0).
4. **Difficult boxes** (VOC) are matched as if absent, then every prior that is still background but
   would have been matched to a difficult box (IoU ``>= iou_threshold``, or its best prior) gets
   class -1: the loss ignores it, neither positive nor negative. A prior that matches a regular box is
   positive for it even if it also overlaps a difficult one.

Padded boxes (``gt_mask`` False) take no part at all; images without boxes are all background.

The same rules written one image, box and prior at a time: :func:`ssd_core.reference.reference_assign_targets`;
the tests check this module against it on random batches and on the SSD300 priors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ssd_core.boxes import box_area, cxcywh_to_xyxy, degenerate_box_mask
from ssd_core.coding import DEFAULT_VARIANCES, encode_boxes
from ssd_core.static_matching import assign_targets_static, wants_static_shapes

IGNORE_LABEL = -1  # class target of priors the loss must skip (matched only to difficult boxes)
_CLAIMED = -2.0  # IoU written over priors already claimed by a forced match (valid IoUs are >= 0)


class Targets(NamedTuple):
    """Training targets for every prior of a batch."""

    loc_targets: Tensor  # [B, P, 4] encoded boxes (see ssd_core.coding); 0 where cls_targets <= 0
    cls_targets: Tensor  # [B, P] int64: 1..C-1 positive, 0 background, -1 ignored


def _interval_groups(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group equal (lo, hi) pairs of ``[P]`` tensors -> (lo [U], hi [U], inverse [P]) with
    ``(lo[inverse], hi[inverse]) == (lo, hi)`` exactly."""
    if lo.dtype == torch.float32:
        # One int64 key per pair from the two float bit patterns: exact, and a single sort.
        key = (lo.view(torch.int32).long() << 32) | (hi.view(torch.int32).long() & 0xFFFFFFFF)  # [P]
        unique_key, inverse = torch.unique(key, return_inverse=True)  # [U], [P]
        low_bits = unique_key & 0xFFFFFFFF
        low_bits = torch.where(low_bits >= 2**31, low_bits - 2**32, low_bits)  # back to signed int32
        return (unique_key >> 32).int().view(torch.float32), low_bits.int().view(torch.float32), inverse
    _, lo_index = torch.unique(lo, return_inverse=True)  # [P]
    _, hi_index = torch.unique(hi, return_inverse=True)  # [P]
    _, inverse = torch.unique(lo_index * (int(hi_index.max()) + 1) + hi_index, return_inverse=True)  # [P]
    count = int(inverse.max()) + 1
    return lo.new_empty(count).index_put_((inverse,), lo), hi.new_empty(count).index_put_((inverse,), hi), inverse


def prior_gt_iou(priors_xyxy: Tensor, gt_boxes: Tensor) -> Tensor:
    """IoU of every prior with every ground-truth box: ``[P, 4]`` priors x ``[N, 4]`` boxes -> ``[P, N]``, xyxy.

    Exactly ``ssd_core.boxes.box_iou(priors_xyxy, gt_boxes)``, bit for bit (the tests check it), for a
    fraction of the work, which is why this second form exists: SSD priors share few distinct x-intervals
    and y-intervals (334 of each for the 8,732 SSD300 priors), so overlap widths and heights are computed per
    distinct interval and only their product is formed per prior, with the same float operations as
    ``box_iou``. Works for any priors with positive area (without repeats it is just slower). Priors-major
    layout so that the per-prior gathers copy whole rows.
    """
    x_lo, x_hi, x_inv = _interval_groups(priors_xyxy[:, 0], priors_xyxy[:, 2])  # [Ux], [Ux], [P]
    y_lo, y_hi, y_inv = _interval_groups(priors_xyxy[:, 1], priors_xyxy[:, 3])  # [Uy], [Uy], [P]
    bx1, by1, bx2, by2 = gt_boxes.unbind(-1)  # each [N]
    overlap_w = (torch.minimum(bx2, x_hi[:, None]) - torch.maximum(bx1, x_lo[:, None])).clamp_(min=0)  # [Ux, N]
    overlap_h = (torch.minimum(by2, y_hi[:, None]) - torch.maximum(by1, y_lo[:, None])).clamp_(min=0)  # [Uy, N]
    inter = overlap_w.index_select(0, x_inv).mul_(overlap_h.index_select(0, y_inv))  # [P, N]
    union = torch.add(box_area(priors_xyxy)[:, None], box_area(gt_boxes)).sub_(inter)  # [P, N], > 0: priors have area
    return inter.div_(union)


def _first_per_group(keys: Tensor, *orders: tuple[Tensor, bool]) -> Tensor:
    """Positions of the first element of each ``keys`` group after ordering by ``orders`` (value, descending)
    in priority order: returns ``[K]`` indices into ``keys``, one per distinct key."""
    perm = torch.arange(keys.numel(), device=keys.device)
    for values, descending in reversed(orders):  # least significant first; stable sorts keep earlier orders
        perm = perm[torch.sort(values[perm], descending=descending, stable=True).indices]
    perm = perm[torch.sort(keys[perm], stable=True).indices]
    sorted_keys = keys[perm]
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return perm[first]


def _forced_matches(
    iou: Tensor, best_prior: Tensor, best_iou: Tensor, image: Tensor, claims: Tensor, num_images: int
) -> Tensor:
    """One distinct prior per claiming box (module docstring, step 1).

    Args:
        iou: ``[P, N]`` IoU of the priors with the N valid boxes of the batch, each in [0, 1].
        best_prior, best_iou: ``[N]`` each box's best prior (lowest index on ties) and that IoU.
        image: ``[N]`` image of each box; boxes are in (image, box) order.
        claims: ``[N]`` bool, the boxes that claim a prior (valid and not difficult).

    Returns:
        ``[N]`` int64 prior per box, -1 for non-claiming boxes and for boxes left without a free prior
        (only possible when an image has more boxes than priors).
    """
    num_priors = iou.shape[0]
    box_index = torch.arange(iou.shape[1], device=iou.device)  # [N]
    forced = torch.full_like(box_index, -1)  # [N]
    claimed = torch.zeros(num_images * num_priors, dtype=torch.bool, device=iou.device)  # [B * P]
    pending = claims.nonzero().squeeze(1)  # boxes still proposing
    proposal, proposal_iou = best_prior[pending], best_iou[pending]
    while pending.numel():  # each round settles at least one box per contested prior
        key = image[pending] * num_priors + proposal
        winners = _first_per_group(key, (proposal_iou, True), (pending, True))  # higher IoU, then later box
        forced[pending[winners]] = proposal[winners]
        claimed[key[winners]] = True
        lost = torch.ones_like(pending, dtype=torch.bool)
        lost[winners] = False
        pending = pending[lost]
        if not pending.numel():
            break
        # Losers propose again: their best prior among those not yet claimed in their image.
        columns = iou.index_select(1, pending)  # [P, L]
        taken = claimed.view(num_images, num_priors)[image[pending]].t()  # [P, L]
        proposal_iou, proposal = columns.masked_fill_(taken, _CLAIMED).max(dim=0)  # [L], [L]
        free = proposal_iou >= 0  # no free prior left: that box gets none
        pending, proposal, proposal_iou = pending[free], proposal[free], proposal_iou[free]
    return forced


def _check_inputs(
    gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor, priors: Tensor, gt_difficult: Tensor | None, values: bool
) -> None:
    where = "assign_targets"
    if gt_boxes.ndim != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"{where}: gt_boxes must be [B, G, 4] xyxy, got {list(gt_boxes.shape)}")
    if not gt_boxes.is_floating_point():
        raise TypeError(f"{where}: gt_boxes must be floating point, got {gt_boxes.dtype}")
    batch_gt = tuple(gt_boxes.shape[:2])
    if tuple(gt_labels.shape) != batch_gt or gt_labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{where}: gt_labels must be int64 {list(batch_gt)}, got {gt_labels.dtype} {list(gt_labels.shape)}"
        )
    if tuple(gt_mask.shape) != batch_gt or gt_mask.dtype != torch.bool:
        raise ValueError(f"{where}: gt_mask must be bool {list(batch_gt)}, got {gt_mask.dtype} {list(gt_mask.shape)}")
    if gt_difficult is not None and (tuple(gt_difficult.shape) != batch_gt or gt_difficult.dtype != torch.bool):
        raise ValueError(
            f"{where}: gt_difficult must be bool {list(batch_gt)} or None, "
            f"got {gt_difficult.dtype} {list(gt_difficult.shape)}"
        )
    if priors.ndim != 2 or priors.shape[-1] != 4 or priors.shape[0] == 0:
        raise ValueError(f"{where}: priors must be [P, 4] cxcywh with P > 0, got {list(priors.shape)}")
    if not values:  # the value checks below read the device back; the static path leaves them to its caller
        return
    bad_prior = ~(torch.isfinite(priors).all(dim=1) & (priors[:, 2:] > 0).all(dim=1))  # [P]
    if bool(bad_prior.any()):
        index = int(bad_prior.nonzero()[0, 0])
        raise ValueError(
            f"{where}: priors[{index}] = {priors[index].tolist()}: priors need finite (cx, cy, w, h) with w, h > 0"
        )
    bad = gt_mask & (degenerate_box_mask(gt_boxes) | (gt_labels < 1))  # [B, G]
    if bool(bad.any()):
        b, g = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{where}: gt_boxes[{b}, {g}] = {[round(float(v), 6) for v in gt_boxes[b, g]]} with label "
            f"{int(gt_labels[b, g])}: a valid box needs finite xyxy values with x2 > x1, y2 > y1 and a label >= 1 "
            "(0 is background)"
        )


def assign_targets(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_mask: Tensor,
    priors: Tensor,
    *,
    iou_threshold: float = 0.5,
    variances: tuple[float, float] = DEFAULT_VARIANCES,
    gt_difficult: Tensor | None = None,
    static_shapes: bool | None = None,
) -> Targets:
    """Match a padded batch of ground truth to the priors and encode the regression targets.

    Args:
        gt_boxes: ``[B, G, 4]`` xyxy boxes normalised to [0, 1]; rows where ``gt_mask`` is False are padding
            and may hold anything.
        gt_labels: ``[B, G]`` int64 class of each box, 1..C-1 (0 is background).
        gt_mask: ``[B, G]`` bool, True for real boxes. An image may have none.
        priors: ``[P, 4]`` priors (cx, cy, w, h), normalised.
        iou_threshold: IoU at or above which a prior is positive for its best box, in (0, 1].
        variances: the (centre, size) box-coding variances.
        gt_difficult: optional ``[B, G]`` bool; priors matched only to difficult boxes get class -1.
        static_shapes: True: the dense form of :mod:`ssd_core.static_matching` (no host read, shapes fixed by
            ``[B, G]`` and P, so ``torch.compile(fullgraph=True)`` and CUDA graphs can take it; the box and
            prior *values* are then not checked, only shapes and dtypes). False: the packed form below (the
            fastest on a CPU). None (default): static on an accelerator and while compiling, packed otherwise.
            Both give the same targets.

    Returns:
        ``Targets(loc_targets [B, P, 4], cls_targets [B, P] int64)``; see the module docstring for the rules.

    Reference: :func:`ssd_core.reference.reference_assign_targets` (the rules one box and prior at a time).
    """
    static = wants_static_shapes(gt_boxes, static_shapes)
    _check_inputs(gt_boxes, gt_labels, gt_mask, priors, gt_difficult, values=not static)
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"assign_targets: iou_threshold must be in (0, 1], got {iou_threshold}")
    if static:
        loc, cls = assign_targets_static(
            gt_boxes,
            gt_labels,
            gt_mask,
            priors,
            iou_threshold=iou_threshold,
            variances=variances,
            gt_difficult=gt_difficult,
            ignore_label=IGNORE_LABEL,
        )
        return Targets(loc_targets=loc, cls_targets=cls)
    num_images, num_priors = gt_boxes.shape[0], priors.shape[0]
    device = gt_boxes.device
    priors = priors.to(device=device, dtype=gt_boxes.dtype)
    cls_targets = torch.zeros(num_images * num_priors, dtype=torch.long, device=device)  # [B * P]
    loc_targets = gt_boxes.new_zeros(num_images * num_priors, 4)  # [B * P, 4]

    # The valid boxes of the whole batch, packed: column n of the IoU table is box (image[n], slot[n]).
    image, slot = gt_mask.nonzero(as_tuple=True)  # [N], [N]
    if image.numel():
        boxes = gt_boxes[image, slot]  # [N, 4]
        labels = gt_labels[image, slot].long()  # [N]
        regular = ~gt_difficult[image, slot] if gt_difficult is not None else torch.ones_like(image, dtype=torch.bool)
        iou = prior_gt_iou(cxcywh_to_xyxy(priors), boxes)  # [P, N]

        # The candidate pairs: each box's best priors and every pair at or above the threshold. They are few,
        # so first find the priors that have any (one fast row reduction), then search only their rows.
        best_iou = iou.amax(dim=0)  # [N]
        wanted = best_iou.clamp(max=iou_threshold)  # [N]
        rows = (iou - wanted).amax(dim=1).ge_(0).nonzero().squeeze(1)  # [R] priors with a candidate
        row_iou = iou.index_select(0, rows)  # [R, N]
        pair_row, pair_box = (row_iou >= wanted).nonzero(as_tuple=True)  # [M], [M]
        pair_prior = rows[pair_row]  # [M]
        pair_iou = row_iou[pair_row, pair_box]  # [M]
        pair_key = image[pair_box] * num_priors + pair_prior  # [M], flat index into [B * P]
        is_best = pair_iou == best_iou[pair_box]  # [M]
        best_prior = torch.full_like(best_iou, num_priors, dtype=torch.long).scatter_reduce_(
            0, pair_box[is_best], pair_prior[is_best], "amin"
        )  # [N], lowest index among equal best IoUs

        # Step 2: threshold matches of regular boxes, each prior to its best box (earlier box on ties).
        above = (pair_iou >= iou_threshold) & regular[pair_box]  # [M]
        key, box, prior = pair_key[above], pair_box[above], pair_prior[above]
        first = _first_per_group(key, (pair_iou[above], True), (box, False))  # [K]
        key, box, prior = key[first], box[first], prior[first]  # distinct keys
        cls_targets[key] = labels[box]
        loc_targets[key] = encode_boxes(boxes[box], priors[prior], variances)
        # Step 1: forced matches, written second so they overwrite (distinct keys again).
        forced = _forced_matches(iou, best_prior, best_iou, image, regular, num_images)  # [N]
        box = (forced >= 0).nonzero().squeeze(1)
        key = image[box] * num_priors + forced[box]
        cls_targets[key] = labels[box]
        loc_targets[key] = encode_boxes(boxes[box], priors[forced[box]], variances)

        # Step 4: background priors that a difficult box would have matched are ignored.
        if not bool(regular.all()):
            difficult = ~regular
            near = (pair_iou >= iou_threshold) & difficult[pair_box]  # [M]
            difficult_box = difficult.nonzero().squeeze(1)
            ignore_key = torch.cat((pair_key[near], image[difficult_box] * num_priors + best_prior[difficult_box]))
            ignore_key = torch.unique(ignore_key)
            current = cls_targets[ignore_key]
            cls_targets[ignore_key] = torch.where(current == 0, IGNORE_LABEL, current)
    return Targets(
        loc_targets=loc_targets.view(num_images, num_priors, 4), cls_targets=cls_targets.view(num_images, num_priors)
    )
