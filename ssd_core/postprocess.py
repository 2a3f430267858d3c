"""Post-processing: non-maximum suppression and the SSD detection output (decode, score, NMS, cap).

NMS is the classic greedy algorithm: visit boxes by decreasing score and keep a box unless a box
already kept overlaps it with IoU > ``iou_threshold`` (strictly greater, as torchvision). Ties in score
are visited in index order (a stable sort by decreasing score), so the result is fully determined.

The implementation is exact but has no Python loop over boxes. For boxes sorted in visiting order,
let ``S[i, j] = (i < j) and IoU(i, j) > t``. Greedy NMS is the unique solution of the triangular system
``keep[j] = not any_i(keep[i] and S[i, j])``. Iterating that equation for the whole vector at once
(Jacobi) fixes one more leading entry per round at the very least, so it reaches the solution in at
most K rounds and, on detector outputs, in a handful (the length of the longest chain "a suppresses
b, which would have suppressed c, ..."); the loop stops when an iteration changes nothing ("Cluster-NMS",
Zheng et al. 2020, proves the same). Columns are processed in blocks of at most ``_BLOCK`` boxes: the
kept boxes of earlier blocks suppress a block in one step, then the block iterates on its own, which
bounds both memory and the worst-case number of rounds. Many groups (classes x images) go through
together, in chunks sized so that the IoU temporaries stay in CPU cache (written in place into reused
buffers): on a CPU that is much faster than one big IoU tensor (``benchmarks/bench_postprocess.py``
measures it), and memory stays bounded for any number of boxes.

The IoU is computed with exactly the operations of :func:`ssd_core.boxes.box_iou`, so ``nms`` keeps the
same boxes as a reference built on ``box_iou``, bit for bit, ties included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ssd_core.boxes import box_area
from ssd_core.coding import DEFAULT_VARIANCES, decode_boxes

_BLOCK = 512  # most boxes per group resolved in one IoU block (a [g, 512, 512] tile at most)
_TILE_ELEMENTS = 1 << 19  # pairwise elements per IoU tile: 2 MB of float32, cache-sized on a small CPU


class Detections(NamedTuple):
    """Detections of one image, ordered by decreasing score.

    Attributes:
        boxes: ``[K, 4]`` xyxy in pixels of the original image, clipped to it.
        scores: ``[K]`` class probabilities (softmax), each above the score threshold.
        labels: ``[K]`` int64 class indices in 1..C-1 (0, background, never appears).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor


# ------------------------------------------------------------------------------------------- NMS core
class _Workspace:
    """Three flat float buffers reused by every IoU tile of one call.

    Allocating a fresh multi-megabyte tensor per elementwise op costs more than the op itself (the
    allocator maps and faults in new pages each time), so tiles write into these with ``out=``.
    """

    def __init__(self, elements: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffers = [torch.empty(elements, dtype=dtype, device=device) for _ in range(3)]

    def views(self, *shape: int) -> list[Tensor]:
        n = 1
        for s in shape:
            n *= s
        return [buf[:n].view(shape) for buf in self.buffers]


def _overlaps(
    rows: Tensor, rows_area: Tensor, cols: Tensor, cols_area: Tensor, iou_threshold: float, work: _Workspace
) -> Tensor:
    """``box_iou > iou_threshold`` as 0/1 floats: ``rows [4, g, R]``, ``cols [4, g, M]`` -> ``[g, R, M]``.

    Boxes come coordinate-major (x1, y1, x2, y2 each a contiguous ``[g, n]`` plane) so that every
    pairwise op reads unit-stride rows (with ``[g, n, 4]`` boxes every broadcast op reads with stride 4, many
    times slower). The same float operations in the same order as ``box_iou`` (so the same bits, as
    ``tests/ssd_core/test_postprocess.py`` checks), written into the
    workspace. ``union >= inter`` always holds (rounding is monotonic), so ``box_iou``'s guard for an
    empty union reduces to the ``clamp``. The result is a workspace view, valid until the next call.
    """
    g, r, m = rows.shape[1], rows.shape[2], cols.shape[2]
    w, h, tmp = work.views(g, r, m)
    ax1, ay1, ax2, ay2 = rows.unsqueeze(-1)  # [g, R, 1] each
    bx1, by1, bx2, by2 = cols.unsqueeze(-2)  # [g, 1, M] each
    torch.minimum(ax2, bx2, out=w).sub_(torch.maximum(ax1, bx1, out=tmp)).clamp_(min=0)  # widths
    torch.minimum(ay2, by2, out=h).sub_(torch.maximum(ay1, by1, out=tmp)).clamp_(min=0)  # heights
    inter = w.mul_(h)
    union = torch.add(rows_area.unsqueeze(-1), cols_area.unsqueeze(-2), out=h).sub_(inter)
    iou = inter.div_(union.clamp_(min=torch.finfo(inter.dtype).tiny))
    return torch.gt(iou, iou_threshold, out=tmp)


def _unsuppressed(keep: Tensor, overlap: Tensor) -> Tensor:
    """0/1 ``[g, M]``: 1 where no row i with ``keep[:, i] = 1`` has ``overlap[:, i, j] = 1``.

    ``keep`` is 0/1 float ``[g, R]`` and ``overlap`` 0/1 float ``[g, R, M]``: a sum of zeros and ones is
    exact, so the batched matrix product counts suppressors without rounding.
    """
    return (torch.bmm(keep.unsqueeze(1), overlap).squeeze(1) == 0).to(keep.dtype)


def _resolve_block(overlap: Tensor, alive: Tensor) -> Tensor:
    """Greedy NMS inside one block: ``overlap [g, b, b]`` 0/1 (row i would suppress column j), ``alive [g, b]`` 0/1.

    Returns 0/1 ``[g, b]``: keep[j] = alive[j] and no kept i < j overlaps j. Jacobi iteration from
    ``keep = alive``; the system is triangular, so after r rounds the first r entries are final and a
    round that changes nothing has reached the unique solution. ``keep`` stays inside ``alive``, so dead
    rows never suppress. ``overlap`` is modified in place.
    """
    b = alive.shape[1]
    overlap.triu_(1)  # only earlier boxes (i < j) suppress
    keep = alive
    for _ in range(b):
        new_keep = alive * _unsuppressed(keep, overlap)  # [g, b]
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def _nms_chunk(boxes: Tensor, valid: Tensor, iou_threshold: float, work: _Workspace) -> Tensor:
    """Greedy NMS of ``g`` groups: ``boxes [g, K, 4]`` in visiting order, ``valid [g, K]`` -> keep ``[g, K]``."""
    g, k = valid.shape
    area = box_area(boxes)  # [g, K]
    planes = boxes.permute(2, 0, 1).contiguous()  # [4, g, K]: x1, y1, x2, y2
    keep = torch.zeros(g, k, dtype=boxes.dtype, device=boxes.device)  # 0/1
    for start in range(0, k, _BLOCK):
        end = min(start + _BLOCK, k)
        cols, cols_area = planes[:, :, start:end], area[:, start:end]
        alive = valid[:, start:end].to(boxes.dtype)  # [g, b]
        # Kept boxes of earlier blocks suppress this block at once; rows in tiles to bound memory.
        rows_per_tile = max(1, _TILE_ELEMENTS // (g * (end - start)))
        for r0 in range(0, start, rows_per_tile):
            r1 = min(r0 + rows_per_tile, start)
            over = _overlaps(planes[:, :, r0:r1], area[:, r0:r1], cols, cols_area, iou_threshold, work)  # [g, R, b]
            alive = alive * _unsuppressed(keep[:, r0:r1], over)
        over = _overlaps(cols, cols_area, cols, cols_area, iou_threshold, work)  # [g, b, b]
        keep[:, start:end] = _resolve_block(over, alive)
    return keep > 0


def _nms_padded(boxes: Tensor, counts: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of G independent groups.

    Args:
        boxes: ``[G, K, 4]`` float xyxy; in each group the first ``counts[g]`` boxes are real, in
            visiting order (decreasing score), and the rest is padding.
        counts: ``[G]`` int64, real boxes per group.
        iou_threshold: suppress when IoU > this.

    Returns:
        bool ``[G, K]``, True for kept boxes (never for padding).
    """
    num_groups, k = boxes.shape[:2]
    keep = torch.zeros(num_groups, k, dtype=torch.bool, device=boxes.device)
    if num_groups == 0 or k == 0:
        return keep
    # Largest groups first, so that groups of similar size share a chunk and little padding is processed.
    by_size = torch.argsort(counts, descending=True, stable=True)
    sizes = counts[by_size].tolist()
    largest = sizes[0]
    one_group = largest * min(largest, _BLOCK)  # the biggest tile one group needs
    work = _Workspace(min(num_groups * one_group, max(_TILE_ELEMENTS, one_group)), boxes.dtype, boxes.device)
    first = 0
    while first < num_groups and sizes[first] > 0:
        width = sizes[first]  # the chunk's longest group
        per_chunk = max(1, _TILE_ELEMENTS // (width * min(width, _BLOCK)))
        members = by_size[first : first + per_chunk]
        valid = torch.arange(width, device=boxes.device) < counts[members].unsqueeze(-1)  # [g, width]
        keep[members, :width] = _nms_chunk(boxes[members, :width], valid, iou_threshold, work)
        first += per_chunk
    return keep


def _check_threshold(name: str, iou_threshold: float) -> float:
    value = float(iou_threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected iou_threshold in [0, 1], got {iou_threshold!r}")
    return value


def _check_boxes_scores(name: str, boxes: Tensor, scores: Tensor) -> None:
    if not isinstance(boxes, Tensor) or not isinstance(scores, Tensor):
        raise TypeError(f"{name}: expected tensors, got boxes {type(boxes).__name__}, scores {type(scores).__name__}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{name}: expected boxes [N, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name}: expected floating-point boxes, got {boxes.dtype}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"{name}: expected scores [N] with N = {boxes.shape[0]}, got {list(scores.shape)}")


def _visiting_order(scores: Tensor) -> Tensor:
    """Indices by decreasing score; equal scores keep index order (stable sort)."""
    return torch.sort(scores, descending=True, stable=True).indices


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression.

    Args:
        boxes: ``[N, 4]`` float xyxy, ``x1 <= x2`` and ``y1 <= y2`` (any consistent space).
        scores: ``[N]`` scores; higher is visited first, ties in index order.
        iou_threshold: a box is dropped when its IoU with a kept, higher-ranked box is > this.

    Returns:
        int64 ``[K]`` indices of the kept boxes, by decreasing score (ties: lower index first).
    """
    _check_boxes_scores("nms", boxes, scores)
    threshold = _check_threshold("nms", iou_threshold)
    order = _visiting_order(scores)  # [N]
    n = order.numel()
    counts = torch.full((1,), n, dtype=torch.int64, device=boxes.device)
    keep = _nms_padded(boxes[order].unsqueeze(0), counts, threshold)[0]  # [N]
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS inside each category: boxes with different ``idxs`` never suppress each other.

    Args:
        boxes: ``[N, 4]`` float xyxy.
        scores: ``[N]`` scores.
        idxs: ``[N]`` integer category of each box.
        iou_threshold: IoU above which a lower-ranked box of the same category is dropped.

    Returns:
        int64 ``[K]`` indices of the kept boxes, by decreasing score over all categories (ties: lower
        index first). Equals running :func:`nms` per category and merging.
    """
    _check_boxes_scores("batched_nms", boxes, scores)
    if idxs.shape != scores.shape or idxs.is_floating_point() or idxs.is_complex():
        raise ValueError(
            f"batched_nms: expected integer idxs [N] with N = {scores.shape[0]}, got {idxs.dtype} {list(idxs.shape)}"
        )
    threshold = _check_threshold("batched_nms", iou_threshold)
    n = scores.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = _visiting_order(scores)  # [N] global visiting order
    grouped = order[torch.sort(idxs[order], stable=True).indices]  # [N] by category, visiting order inside
    _, counts = torch.unique_consecutive(idxs[grouped], return_counts=True)  # [G]
    starts = torch.cumsum(counts, 0) - counts  # [G]
    group_of = torch.repeat_interleave(torch.arange(counts.numel(), device=boxes.device), counts)  # [N]
    slot = torch.arange(n, device=boxes.device) - starts[group_of]  # [N] position inside the group
    padded = boxes.new_zeros(counts.numel(), int(counts.max()), 4)  # [G, K, 4]
    padded[group_of, slot] = boxes[grouped]
    keep = _nms_padded(padded, counts, threshold)[group_of, slot]  # [N] over `grouped`
    kept = grouped[keep]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=boxes.device)
    return kept[torch.argsort(rank[kept])]


# ------------------------------------------------------------------------------------ SSD detections
def _group_order(scores: Tensor, groups: Tensor) -> Tensor:
    """Permutation sorting entries by group (ascending), then score (descending); ties keep their order.

    Two stable sorts: by score first, then by group, which keeps the score order inside each group.
    """
    by_score = torch.sort(scores, descending=True, stable=True).indices
    return by_score[torch.sort(groups[by_score], stable=True).indices]


def _ranks(sorted_groups: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """For entries sorted by group: each entry's position inside its group, and the ``[num_groups]`` sizes."""
    sizes = torch.bincount(sorted_groups, minlength=num_groups)  # [num_groups]
    starts = torch.cumsum(sizes, 0) - sizes
    return torch.arange(sorted_groups.numel(), device=sorted_groups.device) - starts[sorted_groups], sizes


def postprocess(
    loc: Tensor,
    cls_logits: Tensor,
    priors: Tensor,
    image_sizes: Tensor | Sequence[Sequence[float]],
    *,
    score_threshold: float = 0.01,
    top_k: int = 400,
    nms_iou: float = 0.45,
    max_detections: int = 200,
    variances: tuple[float, float] = DEFAULT_VARIANCES,
) -> list[Detections]:
    """SSD detection output: the original evaluation settings by default.

    Per image and per foreground class: softmax probability > ``score_threshold``, the ``top_k`` best
    (ties: lower prior index first), greedy NMS at ``nms_iou`` on the decoded boxes clipped to the
    image; then the ``max_detections`` best over all classes of the image (ties: lower class, then the
    order inside the class). Boxes are decoded and clipped in normalised coordinates, NMS runs there
    (IoU does not change when x and y are scaled), and the result is scaled to pixels.

    Only the candidates that pass the threshold (at most ``top_k`` per class) are decoded and sorted;
    NMS runs on all (image, class) groups together (see the module docstring).

    Args:
        loc: ``[B, P, 4]`` predicted offsets.
        cls_logits: ``[B, P, C]`` class logits, class 0 background.
        priors: ``[P, 4]`` cxcywh normalised priors.
        image_sizes: ``[B, 2]`` (width, height) of each original image in pixels.
        score_threshold: per-class probability threshold (original: 0.01).
        top_k: candidates per class and image before NMS (original: 400).
        nms_iou: NMS IoU threshold (original: 0.45).
        max_detections: detections kept per image (original: 200).
        variances: box coding variances.

    Returns:
        ``B`` :class:`Detections`, boxes in pixels of each original image, by decreasing score.
    """
    if loc.ndim != 3 or loc.shape[-1] != 4:
        raise ValueError(f"postprocess: expected loc [B, P, 4], got {list(loc.shape)}")
    b, p = loc.shape[:2]
    if cls_logits.ndim != 3 or cls_logits.shape[:2] != (b, p) or cls_logits.shape[2] < 2:
        got = list(cls_logits.shape)
        raise ValueError(f"postprocess: expected cls_logits [B, P, C] = [{b}, {p}, C >= 2], got {got}")
    if priors.shape != (p, 4):
        raise ValueError(f"postprocess: expected priors [P, 4] with P = {p}, got {list(priors.shape)}")
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=loc.device)
    if sizes.shape != (b, 2):
        got = list(sizes.shape)
        raise ValueError(f"postprocess: expected image_sizes [B, 2] (width, height) with B = {b}, got {got}")
    if top_k < 1 or max_detections < 1:
        raise ValueError(f"postprocess: expected top_k >= 1 and max_detections >= 1, got {top_k} and {max_detections}")
    threshold = _check_threshold("postprocess", nms_iou)
    c = cls_logits.shape[2] - 1  # foreground classes
    device = loc.device

    if b == 0:
        return []
    scores = torch.softmax(cls_logits.float(), dim=-1)[..., 1:]  # [B, P, C-1] (a view)
    passed = scores > score_threshold  # [B, P, C-1]
    if top_k < p and int(passed.sum(1).max()) > top_k:
        # Where more than top_k pass, only scores >= the top_k-th largest can be among the top_k (more
        # than top_k only when that value is tied; the rank cut below settles ties by prior index).
        kth = torch.topk(scores, top_k, dim=1).values[:, -1:, :]  # [B, 1, C-1]
        passed &= scores >= kth
    image, prior, cls = passed.nonzero(as_tuple=True)  # [N] each, ordered by (image, prior, class)
    cand_scores = scores[image, prior, cls]  # [N]
    groups = image * c + cls  # [N] one group per (image, class)

    # Candidates by group, then decreasing score; ties keep prior order. Keep the top_k of each group.
    order = _group_order(cand_scores, groups)
    rank, counts = _ranks(groups[order], b * c)
    order, rank = order[rank < top_k], rank[rank < top_k]
    counts = counts.clamp(max=top_k)  # [B*(C-1)]
    image, prior, cls, cand_scores, groups = image[order], prior[order], cls[order], cand_scores[order], groups[order]

    priors = priors.to(device=device, dtype=torch.float32)
    boxes = decode_boxes(loc[image, prior].float(), priors[prior], variances).clamp_(0.0, 1.0)  # [N, 4]
    width = int(counts.max()) if counts.numel() else 0
    padded = boxes.new_zeros(b * c, width, 4)  # [B*(C-1), k, 4]
    padded[groups, rank] = boxes
    keep = _nms_padded(padded, counts, threshold)[groups, rank]  # [N]
    image, cls, cand_scores, boxes = image[keep], cls[keep], cand_scores[keep], boxes[keep]

    # The best max_detections per image; entries are in (class, rank) order, so ties go to the lower
    # class, then to the earlier candidate.
    order = _group_order(cand_scores, image)
    rank, per_image = _ranks(image[order], b)
    order = order[rank < max_detections]
    per_image = per_image.clamp(max=max_detections).tolist()
    image, cls, cand_scores, boxes = image[order], cls[order], cand_scores[order], boxes[order]
    boxes_px = boxes * sizes[image].repeat(1, 2)  # [K_total, 4] (w, h, w, h)
    return [
        Detections(*parts)
        for parts in zip(
            boxes_px.split(per_image), cand_scores.split(per_image), (cls + 1).split(per_image), strict=True
        )
    ]
