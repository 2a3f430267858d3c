"""Streaming loaders over the shards of ``python -m pipeline shard``: distributed training and evaluation.

Training (``train_loader``): rank ``rank`` of ``world_size`` gets its share of each global step's batch
as ``pipeline.shards.order`` plans it (the global batches depend on (seed, step) only, never on the world
size). Step k's batch goes to DataLoader worker ``k mod num_workers``, which reads exactly those samples
with ranged reads (``pipeline.shards.reader``), plans their augmentation together and decodes them
(``pipeline.shards.samples``); the DataLoader hands batches back in step order. Each sample's augmentation
is seeded by ``(seed, epoch, sample key)`` and every batch is computed on one intra-op thread, so a batch
is a function of (shards, seed, step, rank, world_size) only: the worker count changes nothing, and
``start_step=k`` starts at step k without reading or decoding the batches before it.

One loader streams any number of steps (``num_steps``) across epoch boundaries: the same worker processes
keep going, prefetching the next epoch's first batches while the last ones of this epoch train. A loader
per epoch would start and stop its workers every epoch and let the pipeline run dry at each boundary.

A corrupt sample (unreadable bytes, bad JPEG, bad JSON, a record field out of bounds: ``CorruptSample``)
is skipped and counted in ``TrainBatch.num_bad`` of the batch it belonged to; the batch is then smaller (in
the extreme, empty: ``[0, 3, S, S]``), but the number of batches never changes. Nothing sleeps or retries.
Evaluation (``eval_loader``), which must see every sample, raises ``ShardError`` instead.

Shards may live in a local folder or at an fsspec URL. ``load_manifest(shards, verify=True)`` (sha256 +
member counts) should run once before training; the loaders themselves check only that every shard
exists with its recorded size.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards.batch import TrainBatch, collate_train
from pipeline.shards.manifest import ShardError, ShardManifest, load_manifest
from pipeline.shards.order import epoch_plan, rank_share, sample_seed, steps_per_epoch
from pipeline.shards.reader import CorruptSample, ShardReader
from pipeline.shards.samples import decode_sample, train_samples
from ssd_core.augment import AugmentOptions, Sample, eval_transform

logger = logging.getLogger(__name__)


class EvalBatch(NamedTuple):
    images: Tensor  # uint8 [B, 3, S, S]
    keys: list[str]  # source ids, e.g. "VOC2007/000005"
    sizes: Tensor  # int64 [B, 2] (width, height) of the stored image, pixels
    boxes: list[Tensor]  # B x float32 [G, 4] xyxy pixels
    labels: list[Tensor]  # B x int64 [G]
    difficult: list[Tensor]  # B x bool [G]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Compute a batch on one intra-op thread, as DataLoader workers do: some float ops round differently
    with more threads, and the batches must not depend on where they are made (``num_workers=0`` included)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _iterate(dataset: IterableDataset, num_workers: int, **options: Any) -> Iterator[Any]:
    """Batches of ``dataset`` in order: in this process, or from ``num_workers`` DataLoader workers (each makes
    every ``num_workers``-th batch, see ``_worker_share``; the DataLoader returns them round-robin)."""
    if num_workers == 0:
        return iter(dataset)
    return iter(DataLoader(dataset, batch_size=None, num_workers=num_workers, **options))


def _worker_share(count: int) -> range:
    """Positions ``0..count-1`` this DataLoader worker produces: ``worker_id, worker_id + num_workers, ...``."""
    info = get_worker_info()
    return range(0, count) if info is None else range(info.id, count, info.num_workers)


# --------------------------------------------------------------------------------------- training
class _TrainBatches(IterableDataset):
    """This rank's batches of global steps ``start .. start + count - 1`` (module docstring)."""

    def __init__(
        self,
        reader: ShardReader,
        *,
        start: int,
        count: int,
        rank: int,
        world_size: int,
        global_batch: int,
        image_size: int,
        augment: AugmentOptions,
        seed: int,
        num_classes: int,
        max_boxes: int | None,
    ) -> None:
        self.reader, self.start, self.count, self.max_boxes = reader, start, count, max_boxes
        self.share = rank_share(global_batch, rank=rank, world_size=world_size)
        self.global_batch, self.image_size, self.augment, self.seed = global_batch, image_size, augment, seed
        self.num_classes = num_classes
        self._plan: tuple[int, np.ndarray] | None = None  # the last epoch's plan [steps, global_batch], cached

    def plan_of(self, epoch: int) -> np.ndarray:
        if self._plan is None or self._plan[0] != epoch:
            plan = epoch_plan(len(self.reader), seed=self.seed, epoch=epoch, global_batch=self.global_batch)
            self._plan = (epoch, plan)
        return self._plan[1]

    def __iter__(self) -> Iterator[TrainBatch]:
        per_epoch = steps_per_epoch(len(self.reader), global_batch=self.global_batch)
        try:
            for position in _worker_share(self.count):
                epoch, index = divmod(self.start + position, per_epoch)
                with _one_thread():
                    batch = self._batch(self.plan_of(epoch)[index][self.share], epoch)
                yield batch
        finally:
            self.reader.close()

    def _batch(self, indices: np.ndarray, epoch: int) -> TrainBatch:
        positions = list(enumerate(indices.tolist()))  # (position in the batch, sample index)
        outcomes: dict[int, Sample | CorruptSample] = {}  # by position
        readable, members, generators = [], [], []
        for position, index in positions:
            try:
                members.append(self.reader.read(index))
            except CorruptSample as error:
                outcomes[position] = error
                continue
            readable.append(position)
            key = self.reader.locations[index][1].key
            generators.append(torch.Generator().manual_seed(sample_seed(self.seed, epoch, key)))
        made = train_samples(
            members,
            self.num_classes,
            image_size=self.image_size,
            augment=self.augment,
            generators=generators,
            max_boxes=self.max_boxes,
        )
        outcomes.update(zip(readable, made, strict=True))
        samples, used, bad = [], [], 0
        for position, index in positions:
            if isinstance(outcomes[position], CorruptSample):
                bad += 1
                logger.warning("skipped corrupt sample %s: %s", self.reader.describe(index), outcomes[position])
            else:
                samples.append(outcomes[position])
                used.append(index)
        batch = collate_train(samples, self.image_size, bad, max_boxes=self.max_boxes)
        return batch._replace(sample_ids=torch.tensor(used, dtype=torch.int64))


class TrainLoader:
    """This rank's training batches of ``num_steps`` global steps from ``start_step`` (see the module docstring).
    ``len()`` is the steps of one epoch, whatever the rank, world size or start; ``remaining`` is how many
    batches iteration yields."""

    def __init__(
        self,
        manifest: ShardManifest,
        *,
        split: str,
        rank: int,
        world_size: int,
        global_batch: int,
        image_size: int,
        augment: AugmentOptions,
        seed: int,
        num_workers: int,
        start_step: int = 0,
        num_steps: int | None = None,
        multiprocessing_context: str | None = None,
        pin_memory: bool = False,
        max_boxes: int | None = None,
    ) -> None:
        if not isinstance(augment, AugmentOptions):
            raise TypeError(f"train_loader: expected augment as an AugmentOptions, got {type(augment).__name__}")
        if num_workers < 0:
            raise ValueError(f"train_loader: expected num_workers >= 0, got {num_workers}")
        if start_step < 0 or (num_steps is not None and num_steps < 0):
            raise ValueError(
                f"train_loader: expected start_step >= 0 and num_steps >= 0, got {start_step}, {num_steps}"
            )
        self.manifest, self.num_workers = manifest, num_workers
        self.loader_options = {"multiprocessing_context": multiprocessing_context, "pin_memory": pin_memory}
        self.reader = ShardReader(manifest.root, manifest.split_shards(split))
        self.steps_per_epoch = steps_per_epoch(len(self.reader), global_batch=global_batch)
        rank_share(global_batch, rank=rank, world_size=world_size)  # ValueError for a bad rank or world size
        if num_steps is None:  # to the end of start_step's epoch
            num_steps = self.steps_per_epoch - start_step % self.steps_per_epoch
        self.remaining = num_steps
        self.dataset = _TrainBatches(
            self.reader,
            start=start_step,
            count=num_steps,
            rank=rank,
            world_size=world_size,
            global_batch=global_batch,
            image_size=image_size,
            augment=augment,
            seed=seed,
            num_classes=len(manifest.classes),
            max_boxes=max_boxes,
        )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[TrainBatch]:
        return _iterate(self.dataset, self.num_workers, **self.loader_options)


def train_loader(
    shards: str,
    *,
    rank: int,
    world_size: int,
    global_batch: int,
    image_size: int,
    augment: AugmentOptions,
    seed: int,
    num_workers: int,
    start_step: int = 0,
    num_steps: int | None = None,
    split: str = "train",
    verify: bool = False,
    multiprocessing_context: str | None = None,
    pin_memory: bool = False,
    max_boxes: int | None = None,
) -> TrainLoader:
    """Rank ``rank``'s share of the global batches of steps ``start_step .. start_step + num_steps - 1``
    (default: to the end of ``start_step``'s epoch), in one stream across epochs (see ``TrainLoader``).

    ``verify=True`` recomputes every shard's sha256 first (``load_manifest``); by default only the shard
    sizes are checked, as the driver is expected to have verified once before training.
    ``multiprocessing_context`` and ``pin_memory`` (for GPU training) go to the DataLoader. ``max_boxes``
    (``train.max_boxes``): pad every batch's ground truth to this many boxes, skipping a sample whose record
    holds more as corrupt (``pipeline.shards.batch``); None pads to each batch's largest count.
    """
    manifest = load_manifest(shards, verify=verify)
    return TrainLoader(
        manifest,
        split=split,
        rank=rank,
        world_size=world_size,
        global_batch=global_batch,
        image_size=image_size,
        augment=augment,
        seed=seed,
        num_workers=num_workers,
        start_step=start_step,
        num_steps=num_steps,
        multiprocessing_context=multiprocessing_context,
        pin_memory=pin_memory,
        max_boxes=max_boxes,
    )


# ------------------------------------------------------------------------------------- evaluation
class _EvalBatches(IterableDataset):
    def __init__(self, reader: ShardReader, batch_size: int, image_size: int, num_classes: int) -> None:
        self.reader, self.batch_size, self.image_size, self.num_classes = reader, batch_size, image_size, num_classes

    def __len__(self) -> int:
        return math.ceil(len(self.reader) / self.batch_size)

    def __iter__(self) -> Iterator[EvalBatch]:
        try:
            for position in _worker_share(len(self)):
                start = position * self.batch_size
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
    """Every sample of a split exactly once, in manifest order, in batches of ``batch_size`` (last smaller)."""

    def __init__(
        self,
        manifest: ShardManifest,
        *,
        split: str,
        batch_size: int,
        image_size: int,
        num_workers: int,
        multiprocessing_context: str | None = None,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"eval_loader: expected batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}"
            )
        self.manifest, self.num_workers = manifest, num_workers
        self.loader_options = {"multiprocessing_context": multiprocessing_context, "pin_memory": pin_memory}
        self.dataset = _EvalBatches(
            ShardReader(manifest.root, manifest.split_shards(split)), batch_size, image_size, len(manifest.classes)
        )

    def __len__(self) -> int:
        return len(self.dataset)

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
    verify: bool = False,
    multiprocessing_context: str | None = None,
    pin_memory: bool = False,
) -> EvalLoader:
    """Evaluation batches: every sample of ``split`` once, in a fixed order, with source id, size and GT."""
    manifest = load_manifest(shards, verify=verify)
    return EvalLoader(
        manifest,
        split=split,
        batch_size=batch_size,
        image_size=image_size,
        num_workers=num_workers,
        multiprocessing_context=multiprocessing_context,
        pin_memory=pin_memory,
    )
