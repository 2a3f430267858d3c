"""Validation during training: every rank scores a disjoint slice of the validation split, rank 0 the whole.

``Validator.run(weights)`` is called by every rank at the same steps (``train.val_every_steps`` and the
last step). It loads ``weights`` into a private copy of the model (contiguous memory, eval mode, full
precision: what ``python -m pipeline evaluate`` builds from the model file), takes rank 0's BatchNorm
statistics, and runs ``pipeline.report.scoring.run_inference`` over batches ``rank, rank + W, ...`` of the
validation split (``pipeline.shards.eval_loader``), the batches being the ones ``evaluate`` makes with
``eval.batch_size``. Rank 0 gathers every rank's detections, puts them back in split order and scores them
with ``score_detections``: the same decoding, suppression (``params.eval``) and metric code as
``evaluate``, on the same images in the same order, so the mAP is that of ``evaluate`` on these weights.
The scores are broadcast, so every rank returns the same dict and takes the same decisions from it.

``val/loss`` is the multibox loss of the whole split: per batch the loss summed over its priors
(``multibox_loss``'s batch-normalised total times its matched priors), summed over the split and divided
by the split's matched priors; as in training, IoU ``train.iou_threshold`` makes a positive.

Collectives, in this order on every rank: a broadcast per BatchNorm buffer, ``gather_object`` of the
detections, one ``all_reduce`` of the loss sums, ``broadcast_object_list`` of the scores. Without a
process group (one process, a unit test) there are none.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.report.scoring import SUMMARY_KEYS, Collected, run_inference, score_detections
from pipeline.training.job import TrainJob
from ssd_core.loss import multibox_loss
from ssd_core.matching import assign_targets
from ssd_core.model import SSD

logger = logging.getLogger(__name__)

LOGGED_KEYS = ("map_voc07", "map_voc", "map_coco", "ap50", "ap75")  # val/<key> per validation, with val/loss


class Validator:
    """Scores weights on the validation split; one per rank, built once, reused at every validation."""

    def __init__(self, job: TrainJob, rank: int, world: int, model: SSD, device: torch.device) -> None:
        self.job, self.rank, self.world, self.device = job, rank, world, device
        self.every = job.params.train.val_every_steps
        self.cfg = dataclasses.replace(job.params.eval, num_sample_images=0)  # no detection grid
        self.model = copy.deepcopy(model).to(device=device, memory_format=torch.contiguous_format).eval()
        self.priors = self.model.priors().to(device)  # [P, 4] cxcywh

    def due(self, step: int) -> bool:
        """Whether the validation after ``step`` steps is due: every ``val_every_steps`` and at the last."""
        return bool(self.every) and (step % self.every == 0 or step == self.job.params.train.max_steps)

    @torch.no_grad()
    def run(self, weights: dict[str, Tensor]) -> dict[str, float]:
        """``val/<key>`` scores of ``weights`` (a state dict of this model) and ``val/seconds``, on every rank."""
        started = time.perf_counter()
        self.model.load_state_dict(weights)
        _take_rank0_buffers(self.model)
        sums = torch.zeros(2, dtype=torch.float64)  # [loss summed over priors, matched priors]

        def add_loss(batch, output) -> None:
            sums.add_(_loss_sums(batch, output, self.priors, self.job.params.train.iou_threshold))

        collected = run_inference(
            self.model,
            self.job.shards,
            self.cfg,
            device=self.device,
            num_workers=0,
            progress=False,
            rank=self.rank,
            world_size=self.world,
            on_batch=add_loss,
        )
        slices = _gather_to_rank0(collected._replace(samples=[]), self.rank, self.world)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        scores: dict[str, float] = {}
        if self.rank == 0:
            result = score_detections(merge_slices(slices), list(self.job.classes))
            scores = {f"val/{key}": float(result.summary[key]) for key in SUMMARY_KEYS}
            scores["val/loss"] = float(sums[0] / sums[1].clamp(min=1))
        scores = _broadcast_from_rank0(scores)
        scores["val/seconds"] = time.perf_counter() - started
        return scores


def _loss_sums(batch, output, priors: Tensor, iou_threshold: float) -> Tensor:
    """``[loss summed over the batch's priors, matched priors]`` (float64) of one ``EvalBatch``."""
    device = priors.device
    g = max((len(b) for b in batch.boxes), default=0)
    b = len(batch.boxes)
    boxes = torch.zeros(b, g, 4)
    labels = torch.zeros(b, g, dtype=torch.int64)
    difficult = torch.zeros(b, g, dtype=torch.bool)
    mask = torch.zeros(b, g, dtype=torch.bool)
    scale = batch.sizes.to(torch.float32).repeat(1, 2)  # [B, 4] (w, h, w, h)
    for i in range(b):
        n = len(batch.labels[i])
        boxes[i, :n] = batch.boxes[i] / scale[i]  # pixels -> normalised xyxy
        labels[i, :n], difficult[i, :n], mask[i, :n] = batch.labels[i], batch.difficult[i], True
    targets = assign_targets(
        boxes.to(device),
        labels.to(device),
        mask.to(device),
        priors,
        iou_threshold=iou_threshold,
        gt_difficult=difficult.to(device),
    )
    terms = multibox_loss(output.loc, output.cls_logits, targets.loc_targets, targets.cls_targets, normalize="batch")
    positives = terms.num_positives.to(torch.float64)
    return torch.stack([terms.total.to(torch.float64) * positives.clamp(min=1), positives]).cpu()


def _take_rank0_buffers(model: SSD) -> None:
    """Rank 0's BatchNorm statistics on every rank (the parameters are equal already; the statistics differ
    by each rank's last forward until DDP's next broadcast)."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _gather_to_rank0(collected: Collected, rank: int, world: int) -> list[Collected]:
    """Every rank's slice on rank 0 (the other ranks get an empty list)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [collected]
    gathered: list[Collected] | None = [None] * world if rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(collected, gathered, dst=0)
    return list(gathered) if gathered is not None else []


def _broadcast_from_rank0(scores: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return scores
    holder = [scores]
    dist.broadcast_object_list(holder, src=0)
    return dict(holder[0])


def merge_slices(slices: list[Collected]) -> Collected:
    """The ranks' ``Collected`` as one, in split order (by ``order``), as a single process collects it."""
    order = np.concatenate([s.order for s in slices])
    index = np.argsort(order, kind="stable")
    if not np.array_equal(order[index], np.arange(len(order))):
        raise ValueError(f"merge_slices: the slices do not cover 0..{len(order) - 1} exactly once")

    def pick(field: str) -> list:
        flat = [item for s in slices for item in getattr(s, field)]
        return [flat[i] for i in index]

    return Collected(
        keys=pick("keys"),
        sizes=np.concatenate([s.sizes for s in slices])[index].reshape(-1, 2),
        gt_boxes=pick("gt_boxes"),
        gt_labels=pick("gt_labels"),
        gt_difficult=pick("gt_difficult"),
        det_boxes=pick("det_boxes"),
        det_scores=pick("det_scores"),
        det_labels=pick("det_labels"),
        samples=[],
        inference_s=max(s.inference_s for s in slices),
        order=order[index],
    )
