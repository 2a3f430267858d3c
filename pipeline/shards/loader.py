"""Streaming training loader over the shards of ``python -m pipeline shard`` (evaluation: ``eval_loader``).

Training (``train_loader``): rank ``rank`` of ``world_size`` gets the batches ``pipeline.shards.order``
deals it (the same count on every rank, every sample once per global epoch). Batch k goes to DataLoader
worker ``k mod num_workers``, which reads exactly those samples with ranged reads
(``pipeline.shards.reader``), plans their augmentation together and decodes them
(``pipeline.shards.samples``); the DataLoader hands batches back in order 0, 1, 2, ... Each sample's
augmentation is seeded by ``(seed, epoch, sample key)`` and every batch is computed on one intra-op thread,
so a batch is a function of (shards, seed, epoch, rank, world_size, batch index) only: the worker count
changes nothing, and ``skip_batches=k`` starts at batch k without reading or decoding batches 0..k-1.

One loader may run several epochs (``epochs=n``, optionally cut at ``max_batches``): batch positions then
continue across epoch boundaries (position p is batch ``p mod len`` of epoch ``epoch + p // len``) and the
same worker processes keep going, prefetching the next epoch's first batches while the last ones of this
epoch train. A loader per epoch would start and stop its workers every epoch and let the pipeline run dry
at each boundary. The batches are exactly those of the per-epoch loaders, concatenated.

A corrupt sample (unreadable bytes, bad JPEG, bad JSON, a record field out of bounds: ``CorruptSample``)
is skipped and counted in ``TrainBatch.num_bad`` of the batch it belonged to; the batch is then smaller (in
the extreme, empty: ``[0, 3, S, S]``), but the number of batches never changes. Nothing sleeps or retries.
Evaluation (``pipeline.shards.eval_loader``), which must see every sample, raises ``ShardError`` instead.

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

from pipeline.shards.manifest import ShardManifest, load_manifest
from pipeline.shards.order import batches_per_epoch, rank_batches, sample_seed
from pipeline.shards.reader import CorruptSample, ShardReader
from pipeline.shards.samples import train_samples
from ssd_core.augment import AugmentOptions, Sample

logger = logging.getLogger(__name__)


class TrainBatch(NamedTuple):
    images: Tensor  # uint8 [B, 3, S, S]
    boxes: Tensor  # float32 [B, G, 4] xyxy normalised; padding rows are 0
    labels: Tensor  # int64 [B, G], 1..C-1; padding 0
    difficult: Tensor  # bool [B, G]
    mask: Tensor  # bool [B, G]: True for real boxes
    num_bad: int  # corrupt samples skipped from this batch


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
    """Batch positions ``start .. start + count - 1`` of one rank's endless epoch sequence (module docstring)."""

    def __init__(
        self,
        reader: ShardReader,
        *,
        start: int,
        count: int,
        rank: int,
        world_size: int,
        batch_size: int,
        image_size: int,
        augment: AugmentOptions,
        seed: int,
        num_classes: int,
    ) -> None:
        self.reader, self.start, self.count = reader, start, count
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.image_size, self.augment, self.seed = image_size, augment, seed
        self.num_classes = num_classes
        self._epoch_batches: tuple[int, list[np.ndarray]] | None = None  # the last epoch's batches, cached

    def batches_of(self, epoch: int) -> list[np.ndarray]:
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            batches = rank_batches(
                len(self.reader),
                seed=self.seed,
                epoch=epoch,
                rank=self.rank,
                world_size=self.world_size,
                batch_size=self.batch_size,
            )
            self._epoch_batches = (epoch, batches)
        return self._epoch_batches[1]

    def __iter__(self) -> Iterator[TrainBatch]:
        per_epoch = batches_per_epoch(len(self.reader), world_size=self.world_size, batch_size=self.batch_size)
        try:
            for position in _worker_share(self.count):
                epoch, index = divmod(self.start + position, per_epoch)
                with _one_thread():
                    batch = self._batch(self.batches_of(epoch)[index], epoch)
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
            members, self.num_classes, image_size=self.image_size, augment=self.augment, generators=generators
        )
        outcomes.update(zip(readable, made, strict=True))
        samples, bad = [], 0
        for position, index in positions:
            if isinstance(outcomes[position], CorruptSample):
                bad += 1
                logger.warning("skipped corrupt sample %s: %s", self.reader.describe(index), outcomes[position])
            else:
                samples.append(outcomes[position])
        return collate_train(samples, self.image_size, bad)


def collate_train(samples: list[Any], image_size: int, num_bad: int = 0) -> TrainBatch:
    """Stack ``Sample``s into a ``TrainBatch``, padding boxes to the batch's largest count G.

    In a DataLoader worker the images are stacked straight into shared memory (as PyTorch's default collate
    does), so handing the batch to the main process copies nothing.
    """
    b, g = len(samples), max((len(s.labels) for s in samples), default=0)
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


class TrainLoader:
    """Training batches of one rank: ``epochs`` epochs from ``epoch``, starting at batch ``skip_batches`` of
    the first, at most ``max_batches`` in all. ``len()`` is one epoch's batch count, the same on every rank
    whatever the other arguments; ``remaining`` is how many batches iteration yields."""

    def __init__(
        self,
        manifest: ShardManifest,
        *,
        split: str,
        rank: int,
        world_size: int,
        batch_size: int,
        image_size: int,
        augment: AugmentOptions,
        seed: int,
        epoch: int,
        num_workers: int,
        skip_batches: int = 0,
        epochs: int = 1,
        max_batches: int | None = None,
        multiprocessing_context: str | None = None,
        pin_memory: bool = False,
    ) -> None:
        if not isinstance(augment, AugmentOptions):
            raise TypeError(f"train_loader: expected augment as an AugmentOptions, got {type(augment).__name__}")
        if num_workers < 0:
            raise ValueError(f"train_loader: expected num_workers >= 0, got {num_workers}")
        if epoch < 0 or epochs < 1 or (max_batches is not None and max_batches < 0):
            raise ValueError(
                f"train_loader: expected epoch >= 0, epochs >= 1 and max_batches >= 0, got epoch {epoch}, "
                f"epochs {epochs}, max_batches {max_batches}"
            )
        self.manifest, self.epoch, self.num_workers = manifest, epoch, num_workers
        self.loader_options = {"multiprocessing_context": multiprocessing_context, "pin_memory": pin_memory}
        self.reader = ShardReader(manifest.root, manifest.split_shards(split))
        self.batches = rank_batches(
            len(self.reader), seed=seed, epoch=epoch, rank=rank, world_size=world_size, batch_size=batch_size
        )
        if not 0 <= skip_batches <= len(self.batches):
            raise ValueError(
                f"train_loader: expected 0 <= skip_batches <= {len(self.batches)} (batches per "
                f"epoch), got {skip_batches}"
            )
        self.skip_batches = skip_batches
        count = epochs * len(self.batches) - skip_batches
        self.remaining = count if max_batches is None else min(count, max_batches)
        self.dataset = _TrainBatches(
            self.reader,
            start=epoch * len(self.batches) + skip_batches,
            count=self.remaining,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            image_size=image_size,
            augment=augment,
            seed=seed,
            num_classes=len(manifest.classes),
        )

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[TrainBatch]:
        return _iterate(self.dataset, self.num_workers, **self.loader_options)


def train_loader(
    shards: str,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    image_size: int,
    augment: AugmentOptions,
    seed: int,
    epoch: int,
    num_workers: int,
    skip_batches: int = 0,
    epochs: int = 1,
    max_batches: int | None = None,
    split: str = "train",
    verify: bool = False,
    multiprocessing_context: str | None = None,
    pin_memory: bool = False,
) -> TrainLoader:
    """Training batches of one rank: one epoch, or ``epochs`` in one stream (see the module docstring and
    ``TrainLoader``).

    ``verify=True`` recomputes every shard's sha256 first (``load_manifest``); by default only the shard
    sizes are checked, as the driver is expected to have verified once before training.
    ``multiprocessing_context`` and ``pin_memory`` (for GPU training) go to the DataLoader.
    """
    manifest = load_manifest(shards, verify=verify)
    return TrainLoader(
        manifest,
        split=split,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        image_size=image_size,
        augment=augment,
        seed=seed,
        epoch=epoch,
        num_workers=num_workers,
        skip_batches=skip_batches,
        epochs=epochs,
        max_batches=max_batches,
        multiprocessing_context=multiprocessing_context,
        pin_memory=pin_memory,
    )
