"""A tiny hand-made training batch for the step and state tests (no shards, no loader)."""

from __future__ import annotations

import torch

from pipeline.shards.loader import TrainBatch

_COLOURS = {1: (250, 20, 20), 2: (20, 250, 20), 3: (20, 20, 250)}  # label -> RGB of its patch


def tiny_batch(size: int, seed: int = 1) -> TrainBatch:
    """Two ``size`` x ``size`` images: one with two boxes (labels 1, 2), one with one box (label 3) and a padding
    row. Each box is a flat patch of its class's colour on grey noise (drawn from ``seed``), so the boxes can
    be learnt from the pixels. One corrupt sample counted as skipped (``num_bad``)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(100, 156, (2, 3, size, size), dtype=torch.uint8, generator=generator)  # [B, 3, S, S]
    boxes = torch.tensor(
        [
            [[0.10, 0.10, 0.50, 0.60], [0.55, 0.50, 0.95, 0.90]],
            [[0.20, 0.30, 0.70, 0.80], [0.00, 0.00, 0.00, 0.00]],
        ]
    )  # [B, G, 4] xyxy
    labels = torch.tensor([[1, 2], [3, 0]])  # [B, G]
    mask = torch.tensor([[True, True], [True, False]])  # [B, G]
    for b in range(2):
        for g in range(2):
            if mask[b, g]:
                x1, y1, x2, y2 = (boxes[b, g] * size).round().int().tolist()
                colour = torch.tensor(_COLOURS[int(labels[b, g])], dtype=torch.uint8)
                images[b, :, y1:y2, x1:x2] = colour[:, None, None]
    return TrainBatch(images, boxes, labels, torch.zeros(2, 2, dtype=torch.bool), mask, num_bad=1)
