"""A training batch and its collation: images stacked, ground truth padded to a fixed box count.

``train.max_boxes`` fixes G, the padded box count of every batch, so the shapes of a step never change
with the data (``torch.compile`` compiles once; CUDA graphs replay). A sample whose *record* holds more
boxes than that is skipped as corrupt (``pipeline.shards.samples.train_samples``): counted in
``num_bad`` and the run's ``bad_samples`` metric, logged with its key, never silently cut. Skipping rather
than refusing, because the count of one record is known only when a worker reads it, hours into a run; a
whole record rather than a truncated box list, because dropping some of its boxes would teach the model
that visible objects are background. Checking the record (not the boxes left after a random crop) makes
the choice the same every epoch.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import get_worker_info


class TrainBatch(NamedTuple):
    images: Tensor  # uint8 [B, 3, S, S]
    boxes: Tensor  # float32 [B, G, 4] xyxy normalised; padding rows are 0
    labels: Tensor  # int64 [B, G], 1..C-1; padding 0
    difficult: Tensor  # bool [B, G]
    mask: Tensor  # bool [B, G]: True for real boxes
    num_bad: int  # corrupt samples skipped from this batch
    sample_ids: Tensor | None = None  # int64 [B]: the samples' indices in the split (manifest order)


def collate_train(samples: list[Any], image_size: int, num_bad: int = 0, *, max_boxes: int | None = None) -> TrainBatch:
    """Stack ``Sample``s into a ``TrainBatch``, padding boxes to G = ``max_boxes`` (None: the batch's largest count).

    In a DataLoader worker the images are stacked straight into shared memory (as PyTorch's default collate
    does), so handing the batch to the main process copies nothing.

    Raises:
        ValueError: a sample has more than ``max_boxes`` boxes (the loader skips such records before).
    """
    counts = [len(s.labels) for s in samples]
    b, g = len(samples), max(counts, default=0) if max_boxes is None else max_boxes
    if max(counts, default=0) > g:
        raise ValueError(f"collate_train: a sample has {max(counts)} boxes, more than max_boxes={max_boxes}")
    shape = (b, 3, image_size, image_size)
    if get_worker_info() is not None and b:
        images = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)
        torch.stack([s.image for s in samples], out=images)
    else:
        images = torch.stack([s.image for s in samples]) if samples else torch.empty(shape, dtype=torch.uint8)
    boxes = torch.zeros(b, g, 4, dtype=torch.float32)
    labels = torch.zeros(b, g, dtype=torch.int64)
    difficult = torch.zeros(b, g, dtype=torch.bool)
    mask = torch.zeros(b, g, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.labels)
        boxes[i, :n], labels[i, :n], difficult[i, :n], mask[i, :n] = s.boxes, s.labels, s.difficult, True
    return TrainBatch(images, boxes, labels, difficult, mask, num_bad)
