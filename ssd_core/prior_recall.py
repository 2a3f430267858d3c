"""Prior recall: can these priors match these boxes at all?

A ground-truth box that no prior overlaps with IoU >= ``iou_threshold`` is only ever matched by
``assign_targets``'s forced best-prior match, through a prior of the wrong size or shape: the network has no
default box to regress it from. The share of boxes whose best prior reaches the threshold is the *prior
recall*; a class or size range with low prior recall will be detected poorly however long training runs.

Boxes are xyxy normalised to [0, 1] of the (square-resized) model input, as in training; priors are the
model's ``cxcywh`` grid. The IoU is ``ssd_core.matching.prior_gt_iou``, the one target assignment uses.

``fit_prior_sizes`` searches per-level sizes and aspect ratios that maximise prior recall (then mean best
IoU) on a set of boxes, keeping the levels, maps, steps and boxes per location of a starting spec, so the
network and its heads keep their shapes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from ssd_core.boxes import box_iou, cxcywh_to_xyxy
from ssd_core.matching import prior_gt_iou
from ssd_core.priors import PriorSpec, generate_priors

# Boxes per IoU block: [P, CHUNK] float32 is 8,732 x 2,048 x 4 B = 72 MB for SSD300.
CHUNK = 2048


def best_prior_iou(boxes: Tensor, priors_cxcywh: Tensor) -> Tensor:
    """Each box's best IoU with any prior: ``[N, 4]`` xyxy boxes, ``[P, 4]`` priors -> ``[N]`` in [0, 1].

    Boxes of zero area get IoU 0 (no prior can match them).
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"best_prior_iou: expected boxes [N, 4] xyxy, got {tuple(boxes.shape)}")
    priors_xyxy = cxcywh_to_xyxy(priors_cxcywh.to(torch.float32))  # [P, 4]
    boxes = boxes.to(torch.float32)
    best = torch.zeros(boxes.shape[0], dtype=torch.float32)  # [N]
    for start in range(0, boxes.shape[0], CHUNK):
        block = boxes[start : start + CHUNK]  # [n, 4]
        best[start : start + CHUNK] = prior_gt_iou(priors_xyxy, block).amax(dim=0).nan_to_num_(0.0)  # [n]
    return best


def level_best_iou(boxes: Tensor, spec: PriorSpec) -> Tensor:
    """Each box's best IoU with the priors of each level: ``[N, 4]`` xyxy -> ``[L, N]``; the fast form of
    ``best_prior_iou`` (``level_best_iou(...).amax(0)`` equals it; the tests check it).

    With box and prior sizes fixed, the overlap's width falls with the centres' x-distance and its height
    with their y-distance, and IoU rises with the overlap, so a box's best prior of each shape sits at the
    grid centre nearest to the box's centre in x and in y. That is one location per level: ``O(N x A_k)``
    IoUs (``ssd_core.boxes.box_iou``, batched) instead of ``O(N x P)``. Clipped priors change shape at the
    border, so ``spec.clip`` takes the slow path.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"level_best_iou: expected boxes [N, 4] xyxy, got {tuple(boxes.shape)}")
    boxes = boxes.to(torch.float32)
    size = float(spec.image_size)
    rows = []
    for k in range(len(spec.feature_maps)):
        level = _level(spec, k)
        if spec.clip:
            rows.append(best_prior_iou(boxes, generate_priors(level)))
            continue
        fmap, step = level.feature_maps[0], level.steps[0]
        shapes = generate_priors(level)[: level.boxes_per_location[0], 2:]  # [A, 2] (w, h) of location (0, 0)
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [N, 2]
        cell = torch.round(centre.double() * size / step - 0.5).clamp_(0, fmap - 1)  # [N, 2] nearest column, row
        grid = ((cell + 0.5) * step / size).float()  # [N, 2] its centre, as generate_priors computes it
        priors = torch.cat(
            (grid[:, None, :].expand(-1, len(shapes), 2), shapes[None].expand(len(boxes), -1, 2)), dim=-1
        )  # [N, A, 4] cxcywh
        rows.append(box_iou(cxcywh_to_xyxy(priors), boxes[:, None, :]).amax(dim=(1, 2)))  # [N]
    return torch.stack(rows)  # [L, N]


def prior_recall(boxes: Tensor, spec: PriorSpec, iou_threshold: float) -> float:
    """Share of ``boxes`` (``[N, 4]`` xyxy, normalised) whose best prior of ``spec`` reaches ``iou_threshold``;
    1.0 for no boxes."""
    if boxes.shape[0] == 0:
        return 1.0
    return float((level_best_iou(boxes, spec).amax(dim=0) >= iou_threshold).double().mean())


class FitResult(NamedTuple):
    spec: PriorSpec  # the best spec found (the start when nothing beat it)
    recall: float  # its prior recall on the boxes
    mean_iou: float  # its mean best IoU on the boxes
    start_recall: float  # the starting spec's
    start_mean_iou: float
    trials: int  # candidate specs scored


def fit_prior_sizes(
    boxes: Tensor,
    start: PriorSpec,
    iou_threshold: float,
    *,
    trials: int = 400,
    seed: int = 0,
    step: float = 0.25,
) -> FitResult:
    """Random local search over one level at a time, from ``start``, keeping a change only when it raises prior
    recall on ``boxes`` (or keeps it and raises the mean best IoU); so the result never scores below ``start``.

    Each trial picks a level and multiplies its min size, its max size and one of its aspect ratios by
    ``exp(step * N(0, 1))`` (ratios kept > 1, max >= min, sizes within (1 px, 2 x image side]). Only that
    level's IoU is recomputed: a box's best IoU is the maximum over the levels' best IoUs.

    Args:
        boxes: ``[N, 4]`` xyxy normalised to the model input (N >= 1; subsample large sets first).
        start: the spec to improve; its levels, feature maps, steps and ratio counts are kept.
        iou_threshold: the matching threshold (``train.iou_threshold``).
        trials: candidate changes scored.
        seed: the search's own generator seed.
        step: log-scale spread of a change.
    """
    if boxes.shape[0] == 0:
        raise ValueError("fit_prior_sizes: expected at least one box, got none")
    generator = torch.Generator().manual_seed(seed)
    levels = [_level(start, k) for k in range(len(start.feature_maps))]
    per_level = level_best_iou(boxes, start)  # [L, N]
    score = _score(per_level.amax(dim=0), iou_threshold)
    first = score
    side = float(start.image_size)
    for _ in range(trials):
        k = int(torch.randint(len(levels), (1,), generator=generator))
        noise = torch.exp(step * torch.randn(3, generator=generator, dtype=torch.float64)).tolist()
        level = levels[k]
        lo = min(max(level.min_sizes[0] * noise[0], 1.0), 2 * side)
        hi = min(max(level.max_sizes[0] * noise[1], lo), 2 * side)
        ratios = list(level.aspect_ratios[0])
        if ratios:
            r = int(torch.randint(len(ratios), (1,), generator=generator))
            ratios[r] = min(max(ratios[r] * noise[2], 1.05), 10.0)
            if len(set(ratios)) != len(ratios):
                continue
        candidate = replace(level, min_sizes=(lo,), max_sizes=(hi,), aspect_ratios=(tuple(ratios),))
        row = level_best_iou(boxes, candidate)[0]  # [N]
        best = torch.cat((per_level[:k], row[None], per_level[k + 1 :])).amax(dim=0)  # [N]
        new = _score(best, iou_threshold)
        if new > score:
            score, levels[k], per_level[k] = new, candidate, row
    spec = replace(
        start,
        min_sizes=tuple(level.min_sizes[0] for level in levels),
        max_sizes=tuple(level.max_sizes[0] for level in levels),
        aspect_ratios=tuple(level.aspect_ratios[0] for level in levels),
    )
    return FitResult(spec, score[0], score[1], first[0], first[1], trials)


def _level(spec: PriorSpec, k: int) -> PriorSpec:
    """Level ``k`` of ``spec`` as a one-level spec (same image size): its priors are that level's."""
    return PriorSpec(
        image_size=spec.image_size,
        feature_maps=(spec.feature_maps[k],),
        steps=(spec.steps[k],),
        min_sizes=(spec.min_sizes[k],),
        max_sizes=(spec.max_sizes[k],),
        aspect_ratios=(tuple(spec.aspect_ratios[k]),),
        clip=spec.clip,
    )


def _score(best_iou: Tensor, iou_threshold: float) -> tuple[float, float]:
    """(prior recall, mean best IoU), compared in that order."""
    recall = float((best_iou >= iou_threshold).double().mean())
    mean = float(best_iou.double().mean())
    return (recall, mean if math.isfinite(mean) else 0.0)
