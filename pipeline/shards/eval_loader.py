"""Evaluation batches over the shards of ``python -m pipeline shard``: every sample of a split exactly once.

Batches are ``batch_size`` consecutive samples in manifest order (the last smaller), each with its source
id, stored size and ground truth in pixels. With ``world_size`` > 1, rank ``rank`` reads only batches
``rank, rank + world_size, ...`` (validation during training): the slices are disjoint, cover the split, and
each batch holds the very samples it holds on one process, so a distributed evaluation computes what a
single one does. A corrupt sample raises ``ShardError``: evaluation must see every sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from pipeline.shards.loader import _iterate, _one_thread, _worker_share
from pipeline.shards.manifest import ShardError, ShardManifest, load_manifest
from pipeline.shards.reader import CorruptSample, ShardReader
from pipeline.shards.samples import decode_sample
from ssd_core.augment import eval_transform


class EvalBatch(NamedTuple):
    images: Tensor  # uint8 [B, 3, S, S]
    keys: list[str]  # source ids, e.g. "VOC2007/000005"
    sizes: Tensor  # int64 [B, 2] (width, height) of the stored image, pixels
    boxes: list[Tensor]  # B x float32 [G, 4] xyxy pixels
    labels: list[Tensor]  # B x int64 [G]
    difficult: list[Tensor]  # B x bool [G]


class _EvalBatches(IterableDataset):
    def __init__(
        self, reader: ShardReader, batch_size: int, image_size: int, num_classes: int, rank=0, world=1
    ) -> None:
        self.reader, self.batch_size, self.image_size, self.num_classes = reader, batch_size, image_size, num_classes
        self.positions = range(rank, math.ceil(len(reader) / batch_size), world)  # this rank's batches

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[EvalBatch]:
        try:
            for share in _worker_share(len(self)):
                start = self.positions[share] * self.batch_size
                with _one_thread():
                    batch = self._batch(range(start, min(start + self.batch_size, len(self.reader))))
                yield batch
        finally:
            self.reader.close()

    def _batch(self, indices: range) -> EvalBatch:
        images, keys, sizes, boxes, labels, difficult = [], [], [], [], [], []
        for index in indices:
            try:
                decoded = decode_sample(*self.reader.read(index), self.num_classes)
            except CorruptSample as error:
                raise ShardError(
                    f"{self.reader.describe(index)}: {error}; evaluation needs every sample (re-run the shard stage)"
                ) from None
            images.append(eval_transform(decoded.image, self.image_size))
            keys.append(str(decoded.meta["id"]))
            sizes.append((decoded.image.shape[2], decoded.image.shape[1]))
            boxes.append(decoded.boxes_px)
            labels.append(decoded.labels)
            difficult.append(decoded.difficult)
        return EvalBatch(
            torch.stack(images), keys, torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2), boxes, labels, difficult
        )


class EvalLoader:
    """Every sample of a split exactly once, in manifest order, in batches of ``batch_size`` (last smaller);
    with ``world_size`` > 1 rank ``rank``'s batches ``positions`` = ``rank, rank + world_size, ...`` only: the
    slices are disjoint and each batch holds the samples it holds on one process."""

    def __init__(
        self,
        manifest: ShardManifest,
        *,
        split: str,
        batch_size: int,
        image_size: int,
        num_workers: int,
        rank: int = 0,
        world_size: int = 1,
        multiprocessing_context: str | None = None,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
            raise ValueError(
                f"eval_loader: expected batch_size >= 1, num_workers >= 0 and 0 <= rank < world_size, got "
                f"{batch_size}, {num_workers}, {rank}, {world_size}"
            )
        self.manifest, self.num_workers = manifest, num_workers
        self.loader_options = {"multiprocessing_context": multiprocessing_context, "pin_memory": pin_memory}
        reader = ShardReader(manifest.root, manifest.split_shards(split))
        self.dataset = _EvalBatches(reader, batch_size, image_size, len(manifest.classes), rank, world_size)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def positions(self) -> range:
        """Batch positions yielded, in order: sample ``i`` of batch ``p`` is sample ``p * batch_size + i``."""
        return self.dataset.positions

    @property
    def num_samples(self) -> int:
        return len(self.dataset.reader)

    def __iter__(self) -> Iterator[EvalBatch]:
        return _iterate(self.dataset, self.num_workers, **self.loader_options)


def eval_loader(
    shards: str,
    *,
    split: str = "val",
    batch_size: int,
    image_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    verify: bool = False,
    multiprocessing_context: str | None = None,
    pin_memory: bool = False,
) -> EvalLoader:
    """Evaluation batches: every sample of ``split`` once, in a fixed order, with source id, size and GT; with
    ``world_size`` > 1 only rank ``rank``'s disjoint slice of those batches (``EvalLoader``)."""
    manifest = load_manifest(shards, verify=verify)
    return EvalLoader(
        manifest,
        split=split,
        batch_size=batch_size,
        image_size=image_size,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        multiprocessing_context=multiprocessing_context,
        pin_memory=pin_memory,
    )
