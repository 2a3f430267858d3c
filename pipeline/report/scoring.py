"""Evaluate's computation: the model over every sample of a split, and the VOC and COCO scores of what it found.

One code for ``python -m pipeline evaluate`` and for validation during training
(``pipeline.training.validation``), so that both report the same number for the same weights.

``run_inference`` collects, per image, the ground truth and the detections (decoded and suppressed with
``params.eval``), boxes in original-image pixels, plus a few samples for the detection grid (with
``world_size`` > 1, only rank ``rank``'s disjoint slice of the split's batches, ``eval_loader``);
``score_detections`` turns them into ``EvalResult``: VOC07 11-point and VOC2010+ area mAP@0.5
(``ssd_core.metrics``, difficult boxes ignored) and COCO mAP@[.5:.95] with its breakdown
(``pipeline.report.coco_eval``). ``pipeline.stages.evaluate_outputs`` writes them to disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import EvalConfig
from pipeline.report.coco_eval import CocoMetrics, coco_detections, coco_evaluate, coco_ground_truth
from ssd_core.metrics import VocResult, evaluate_voc

SUMMARY_KEYS = ("map_voc07", "map_voc", "map_coco", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
GRID_SCORE_THRESHOLD = 0.3  # detections drawn in the sample grid


class Sample(NamedTuple):
    """One validation image for the detection grid, boxes in the pixels of the resized ``image``."""

    key: str
    image: torch.Tensor  # uint8 [3, S, S]
    det_boxes: np.ndarray  # [K, 4]
    det_scores: np.ndarray  # [K]
    det_labels: np.ndarray  # [K]
    gt_boxes: np.ndarray  # [G, 4]
    gt_labels: np.ndarray  # [G]


class Collected(NamedTuple):
    """Everything the model saw and said, per validation image, boxes in original-image pixels."""

    keys: list[str]
    sizes: np.ndarray  # int64 [N, 2] (width, height)
    gt_boxes: list[np.ndarray]  # N x [G, 4]
    gt_labels: list[np.ndarray]  # N x [G]
    gt_difficult: list[np.ndarray]  # N x [G]
    det_boxes: list[np.ndarray]  # N x [K, 4]
    det_scores: list[np.ndarray]  # N x [K]
    det_labels: list[np.ndarray]  # N x [K]
    samples: list[Sample]
    inference_s: float  # loading + forward + post-processing
    order: np.ndarray | None = None  # int64 [N]: each image's index in the split (slices merge by it)


class EvalResult(NamedTuple):
    summary: dict[str, float]  # SUMMARY_KEYS -> value (NaN: undefined, e.g. no ground truth)
    voc: VocResult
    coco: CocoMetrics
    coco_gt: dict[str, Any]
    coco_dets: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def run_inference(
    model,
    shards: str,
    cfg: EvalConfig,
    *,
    device: torch.device,
    num_workers: int,
    progress: bool = True,
    split: str = "val",
    rank: int = 0,
    world_size: int = 1,
    on_batch: Callable[[Any, Any], None] | None = None,
) -> Collected:
    """Run ``model`` (an ``ssd_core.model.SSD`` in eval mode) over every sample of ``split`` in ``shards``, or
    over rank ``rank``'s slice of its batches when ``world_size`` > 1.

    ``on_batch(batch, output)``: called with each ``EvalBatch`` and the model's raw ``SSDOutput`` (loc
    ``[B, P, 4]``, cls_logits ``[B, P, C]``), e.g. to add up a validation loss.
    """
    from pipeline.shards.eval_loader import eval_loader
    from ssd_core.augment import normalize_images
    from ssd_core.postprocess import postprocess

    loader = eval_loader(
        shards,
        split=split,
        batch_size=cfg.batch_size,
        image_size=model.image_size,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
    )
    priors = model.priors().to(device)  # [P, 4] cxcywh
    order = [p * cfg.batch_size + i for p in loader.positions for i in range(cfg.batch_size)]
    keys: list[str] = []
    sizes, gt_boxes, gt_labels, gt_difficult = [], [], [], []
    det_boxes, det_scores, det_labels = [], [], []
    samples: list[Sample] = []
    started = time.perf_counter()
    bar = tqdm(loader, total=len(loader), desc="evaluate", unit="batch", disable=not progress, leave=False)
    for batch in bar:
        images = normalize_images(batch.images.to(device, non_blocking=True))  # float [B, 3, S, S]
        output = model(images)
        if on_batch is not None:
            on_batch(batch, output)
        detections = postprocess(
            output.loc,
            output.cls_logits,
            priors,
            batch.sizes.to(device),
            score_threshold=cfg.score_threshold,
            top_k=cfg.top_k,
            nms_iou=cfg.nms_iou,
            max_detections=cfg.max_detections,
        )
        for i, det in enumerate(detections):
            keys.append(str(batch.keys[i]))
            sizes.append(batch.sizes[i].tolist())
            gt_boxes.append(batch.boxes[i].cpu().numpy().astype(np.float64).reshape(-1, 4))
            gt_labels.append(batch.labels[i].cpu().numpy().astype(np.int64))
            gt_difficult.append(batch.difficult[i].cpu().numpy().astype(bool))
            det_boxes.append(det.boxes.float().cpu().numpy().astype(np.float64).reshape(-1, 4))
            det_scores.append(det.scores.float().cpu().numpy().astype(np.float64))
            det_labels.append(det.labels.cpu().numpy().astype(np.int64))
            if len(samples) < cfg.num_sample_images:
                samples.append(
                    _sample(
                        batch.images[i],
                        keys[-1],
                        sizes[-1],
                        det_boxes[-1],
                        det_scores[-1],
                        det_labels[-1],
                        gt_boxes[-1],
                        gt_labels[-1],
                    )
                )
        bar.set_postfix(images=len(keys), refresh=False)
    bar.close()
    elapsed = time.perf_counter() - started
    return Collected(
        keys,
        np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        gt_boxes,
        gt_labels,
        gt_difficult,
        det_boxes,
        det_scores,
        det_labels,
        samples,
        elapsed,
        np.asarray(order[: len(keys)], dtype=np.int64),
    )


def _sample(image, key, size, det_boxes, det_scores, det_labels, gt_boxes, gt_labels) -> Sample:
    side_h, side_w = image.shape[-2:]
    scale = np.array([side_w / size[0], side_h / size[1]] * 2)  # original pixels -> resized pixels
    keep = det_scores >= GRID_SCORE_THRESHOLD
    return Sample(
        key, image.cpu(), det_boxes[keep] * scale, det_scores[keep], det_labels[keep], gt_boxes * scale, gt_labels
    )


# ------------------------------------------------------------------------------------------- scoring
def score_detections(collected: Collected, classes: list[str]) -> EvalResult:
    """VOC (ssd_core.metrics) and COCO (faster-coco-eval) metrics of the collected detections."""
    voc = evaluate_voc(
        collected.det_boxes,
        collected.det_scores,
        collected.det_labels,
        collected.gt_boxes,
        collected.gt_labels,
        collected.gt_difficult,
        num_classes=len(classes) + 1,
    )
    coco_gt = coco_ground_truth(
        collected.keys, collected.sizes, collected.gt_boxes, collected.gt_labels, collected.gt_difficult, classes
    )
    coco_dets = coco_detections(collected.det_boxes, collected.det_scores, collected.det_labels)
    coco = coco_evaluate(coco_gt, coco_dets) if collected.keys else _empty_coco(classes)
    summary = {
        "map_voc07": voc.map_voc07,
        "map_voc": voc.map_voc,
        "map_coco": coco.map,
        "ap50": coco.ap50,
        "ap75": coco.ap75,
        "ap_small": coco.ap_small,
        "ap_medium": coco.ap_medium,
        "ap_large": coco.ap_large,
    }
    return EvalResult(summary, voc, coco, coco_gt, coco_dets)


def _empty_coco(classes: list[str]) -> CocoMetrics:
    nan = float("nan")
    return CocoMetrics(*([nan] * 12), per_class_ap={i + 1: nan for i in range(len(classes))}, summary="")
