"""Streaming loaders over the shards of ``python -m pipeline shard``: distributed training and evaluation.

How a training epoch is cut (``rank_batches``; sample-level, not shard-level):

1. The split's N samples (manifest order) are permuted by a generator seeded with ``(seed, epoch)``:
   a fresh order every epoch, mixing samples of all shards (a stronger shuffle than shuffling the shard
   order, and identical whatever the number of workers).
2. The order is padded cyclically to ``ceil(N / W) * W`` and dealt to the W ranks like cards
   (``rank::W``), so every rank gets exactly ``ceil(N / W)`` samples and every sample is used once per
   global epoch (at most W - 1 are used twice to even out the ranks). Uneven shard sizes cannot make one
   rank run out early and hang DDP.
3. Each rank cuts its samples into ``ceil(ceil(N / W) / batch_size)`` batches (the last may be smaller,
   equally on every rank); batch k goes to DataLoader worker ``k mod num_workers``, which reads exactly
   those samples with ranged reads located by the manifest's member table, decodes and augments them.
   The DataLoader hands batches back in order 0, 1, 2, ...

A sample's augmentation draws from a ``torch.Generator`` seeded by ``(seed, epoch, sample key)``, so a
batch is a function of (shards, seed, epoch, rank, world_size, batch index) only: the worker count changes
nothing, and ``skip_batches=k`` starts at batch k without reading or decoding batches 0..k-1.

One loader may run several epochs (``epochs=n``, optionally cut at ``max_batches``): batch positions then
continue across epoch boundaries (position p is batch ``p mod len`` of epoch ``epoch + p // len``) and the
same worker processes keep going, prefetching the next epoch's first batches while the last ones of this
epoch train. A loader per epoch would start and stop its workers every epoch and let the pipeline run dry
at each boundary (~0.1 s per epoch here: about a third of an epoch of the 180-image raccoon set). The
batches are exactly those of the per-epoch loaders, concatenated.

Decoding a training sample uses what the shard format gives for free: the JSON record carries the stored
image's size, so the whole augmentation is planned (every random draw, the crop window, the output boxes)
before a pixel is decoded, for the whole batch at once (``ssd_core.augment.plan_augmentations``: the
per-sample plans, vectorised; ~0.07 instead of ~0.2 ms per sample). When the window is at least 2, 4 or 8
times the output side on both axes, the JPEG is decoded at 1/2, 1/4 or 1/8 of its size by the decoder's
DCT scaling (``decode_reduction``), which skips most of the inverse-DCT and colour work, and the window is
sampled from the smaller image (``render_augmentation(..., reduction=r)``; close to, not bit-equal to, the
full-size result: see ``ssd_core.augment.render``). Orientation is not touched here: the shard stage stores
every image as an upright RGB JPEG (EXIF orientation applied and dropped), and the record's size and boxes
are in that frame. Decoding is libjpeg-turbo through simplejpeg (``pipeline.shards.jpeg``: the same pixels as
PIL, decoded straight into the array that becomes the tensor, ~30% faster); the JPEG header must match
the record's size before any pixel is decoded.

A corrupt sample (unreadable bytes, bad JPEG, bad JSON, a record field out of bounds: ``_parse_record``) is
skipped and counted in ``TrainBatch.num_bad`` of the batch it belonged to; the batch is then smaller (in the
extreme, empty: ``[0, 3, S, S]``), but the number of batches never changes. Nothing sleeps or retries.
Evaluation, which must see every sample, raises ``ShardError`` instead.

Shards may live in a local folder or at an fsspec URL. ``load_manifest(shards, verify=True)`` (sha256 +
member counts) should run once before training; the loaders themselves check only that every shard
exists with its recorded size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import fsspec
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards.jpeg import JpegError, decode_reduction, decode_rgb
from pipeline.shards.manifest import ShardError, ShardInfo, ShardManifest, join, load_manifest
from ssd_core.augment import AugmentOptions, Sample, eval_transform, plan_augmentations, render_augmentation

__all__ = [
    "EvalBatch", "ShardError", "ShardManifest", "TrainBatch", "TrainLoader", "EvalLoader", "batches_per_epoch",
    "eval_loader", "load_manifest", "rank_batches", "train_loader",
]

logger = logging.getLogger(__name__)

OPEN_SHARDS_PER_WORKER = 16  # file handles a worker keeps open (least recently used closed first)
MAX_RECORD_SIDE = 65_535  # the largest side a JPEG can have: no record of a real sample says more
# Pixels one sample may have (~0.8 GB as RGB): 3x the default prepare.max_image_pixels, so no sample prepare
# lets through by default comes near it, while a record (and JPEG) put into a shard by hand cannot make a
# worker allocate what a 65,535 x 65,535 image would need (~12.9 GB).
MAX_SAMPLE_PIXELS = 1 << 28


class TrainBatch(NamedTuple):
    images: Tensor  # uint8 [B, 3, S, S]
    boxes: Tensor  # float32 [B, G, 4] xyxy normalised; padding rows are 0
    labels: Tensor  # int64 [B, G], 1..C-1; padding 0
    difficult: Tensor  # bool [B, G]
    mask: Tensor  # bool [B, G]: True for real boxes
    num_bad: int  # corrupt samples skipped from this batch


class EvalBatch(NamedTuple):
    images: Tensor  # uint8 [B, 3, S, S]
    keys: list[str]  # source ids, e.g. "VOC2007/000005"
    sizes: Tensor  # int64 [B, 2] (width, height) of the stored image, pixels
    boxes: list[Tensor]  # B x float32 [G, 4] xyxy pixels
    labels: list[Tensor]  # B x int64 [G]
    difficult: list[Tensor]  # B x bool [G]


class _Decoded(NamedTuple):
    image: Tensor  # uint8 [3, H, W]
    meta: dict[str, Any]
    boxes_px: Tensor  # float32 [G, 4]
    labels: Tensor  # int64 [G]
    difficult: Tensor  # bool [G]


class _Corrupt(Exception):
    """A sample that cannot be used; caught per sample, never escapes a loader."""


# ------------------------------------------------------------------------------------------- plan
def _seed_words(*values: int) -> list[int]:
    return [int(v) % (1 << 64) for v in values]  # SeedSequence takes non-negative words; seeds may be negative


def epoch_order(num_samples: int, *, seed: int, epoch: int) -> np.ndarray:
    """Permutation of ``range(num_samples)`` for one epoch, from ``(seed, epoch)`` only."""
    return np.random.default_rng(_seed_words(seed, epoch)).permutation(num_samples)


def batches_per_epoch(num_samples: int, *, world_size: int, batch_size: int) -> int:
    """Batches each rank yields per epoch: ``ceil(ceil(N / W) / batch_size)``."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def rank_batches(
    num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int
) -> list[np.ndarray]:
    """Sample indices (manifest order) of each batch of ``rank`` in ``epoch`` (see the module docstring)."""
    if num_samples < 1:
        raise ValueError(f"rank_batches: expected at least one sample, got {num_samples}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank_batches: expected 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"rank_batches: expected batch_size >= 1, got {batch_size}")
    per_rank = math.ceil(num_samples / world_size)
    padded = np.resize(epoch_order(num_samples, seed=seed, epoch=epoch), per_rank * world_size)  # cyclic padding
    mine = padded[rank::world_size]  # [per_rank]
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """Augmentation seed of one sample in one epoch (63 bits of blake2b; independent of rank and worker)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ---------------------------------------------------------------------------------------- reading
class _ShardReader:
    """Ranged reads of samples from the shards of one split; opened lazily inside each worker process."""

    def __init__(self, root: str, shards: tuple[ShardInfo, ...]) -> None:
        self.root = root
        self.shards = shards
        self.locations = [(s, loc) for s in shards for loc in s.samples]  # manifest order
        self._fs: Any = None
        self._base = ""
        self._open: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.locations)

    def describe(self, index: int) -> str:
        shard, loc = self.locations[index]
        return f"{join(self.root, shard.name)} sample {loc.key}"

    def read(self, index: int) -> tuple[bytes, bytes]:
        """(jpg bytes, json bytes) of sample ``index``; ``_Corrupt`` when they cannot be read whole."""
        shard, loc = self.locations[index]
        start = min(loc.jpg_offset, loc.json_offset)
        end = max(loc.jpg_offset + loc.jpg_size, loc.json_offset + loc.json_size)
        try:
            handle = self._handle(shard.name)
            handle.seek(start)
            data = handle.read(end - start)
        except OSError as error:
            raise _Corrupt(f"cannot read ({type(error).__name__}: {error})") from None
        if len(data) != end - start:
            raise _Corrupt(f"shard ends early: read {len(data)} of {end - start} bytes")
        return (data[loc.jpg_offset - start : loc.jpg_offset - start + loc.jpg_size],
                data[loc.json_offset - start : loc.json_offset - start + loc.json_size])

    def _handle(self, name: str) -> Any:
        if self._fs is None:
            self._fs, self._base = fsspec.core.url_to_fs(self.root)
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        if len(self._open) >= OPEN_SHARDS_PER_WORKER:
            self._open.popitem(last=False)[1].close()
        handle = self._fs.open(join(self._base, name), "rb")
        self._open[name] = handle
        return handle

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


class _Record(NamedTuple):
    meta: dict[str, Any]
    width: int
    height: int
    boxes_px: Tensor  # float32 [G, 4]
    labels: Tensor  # int64 [G]
    difficult: Tensor  # bool [G]


def _numbers(values: Any, dtype: type, kinds: str, shape: tuple[int, ...]) -> np.ndarray:
    """A JSON list as a NumPy array of ``dtype`` and ``shape``; TypeError unless its items are of ``kinds``."""
    array = np.asarray(values)
    if array.size and array.dtype.kind not in kinds:
        raise TypeError(f"expected numbers ({kinds}), got {array.dtype}")
    return array.astype(dtype).reshape(shape)


def _parse_record(meta_bytes: bytes, num_classes: int) -> _Record:
    """The JSON member, checked field by field; ``_Corrupt`` for anything that does not match what shard wrote.

    ``id``: a string. ``width``/``height``: ints in 1..``MAX_RECORD_SIDE`` with at most ``MAX_SAMPLE_PIXELS``
    pixels. ``boxes``: ``[G, 4]`` finite xyxy pixels inside the image (``0 <= x1 <= x2 <= width``, likewise
    for y; compared in float32, the precision they are read at). ``labels``: ``[G]`` ints in
    1..``num_classes``. ``difficult``: ``[G]`` booleans (or the ints 0/1).
    """
    try:
        meta = json.loads(meta_bytes)
        if not isinstance(meta, dict):
            raise TypeError(f"expected an object, got {type(meta).__name__}")
        sample_id, width, height = meta["id"], meta["width"], meta["height"]
        with np.errstate(over="ignore"):  # a number beyond float32 becomes inf, refused below as non-finite
            boxes = _numbers(meta["boxes"], np.float32, "fiu", (-1, 4))  # [G, 4] pixels
        labels = _numbers(meta["labels"], np.int64, "iu", (-1,))  # [G]
        difficult = _numbers(meta["difficult"], np.int64, "biu", (-1,))  # [G]
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
        raise _Corrupt(f"bad JSON record ({type(error).__name__}: {error})") from None
    if not isinstance(sample_id, str):
        raise _Corrupt(f"JSON record: id must be a string, got {type(sample_id).__name__}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_RECORD_SIDE for v in (width, height)):
        raise _Corrupt(f"JSON record: width and height must be ints in 1..{MAX_RECORD_SIDE}, got {width!r} x "
                       f"{height!r}")
    if width * height > MAX_SAMPLE_PIXELS:
        raise _Corrupt(f"JSON record: {width} x {height} = {width * height} pixels, more than {MAX_SAMPLE_PIXELS} "
                       "(MAX_SAMPLE_PIXELS)")
    if not (len(boxes) == len(labels) == len(difficult)) or not np.isfinite(boxes).all():
        raise _Corrupt("JSON record: boxes, labels and difficult disagree in length or hold non-finite values")
    outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if (outside | inverted).any():
        row = int(np.flatnonzero(outside | inverted)[0])
        raise _Corrupt(f"JSON record: box {row} {boxes[row].tolist()} is not inside the {width} x {height} image "
                       "(0 <= x1 <= x2 <= width, 0 <= y1 <= y2 <= height)")
    if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
        raise _Corrupt(f"JSON record: labels outside 1..{num_classes}")
    if len(difficult) and (difficult.min() < 0 or difficult.max() > 1):
        raise _Corrupt("JSON record: difficult flags must be false/true (or 0/1)")
    return _Record(meta, width, height, torch.from_numpy(boxes), torch.from_numpy(labels),
                   torch.from_numpy(difficult.astype(np.bool_)))


def _pixels(jpg: bytes, width: int, height: int, reduction: int = 1) -> Tensor:
    """Decode the JPEG member at ``1 / reduction`` -> uint8 ``[3, H', W']`` (HWC memory, its own storage).
    The header must give the record's size (checked before decoding: no bomb, no tampered member)."""
    try:
        return torch.from_numpy(decode_rgb(jpg, width=width, height=height, reduction=reduction)).permute(2, 0, 1)
    except JpegError as error:
        raise _Corrupt(str(error)) from None


def decode_sample(jpg: bytes, meta_bytes: bytes, num_classes: int) -> _Decoded:
    """Decode one sample's members at full size; ``_Corrupt`` for anything that does not match what shard wrote."""
    record = _parse_record(meta_bytes, num_classes)
    pixels = _pixels(jpg, record.width, record.height)
    return _Decoded(pixels, record.meta, record.boxes_px, record.labels, record.difficult)


def train_samples(members: Sequence[tuple[bytes, bytes]], num_classes: int, *, image_size: int,
                  augment: AugmentOptions, generators: Sequence[torch.Generator]) -> list[Sample | _Corrupt]:
    """Augmented training samples from their shard members (jpg, json), one generator each.

    The records are parsed first and the whole batch is planned at once (``plan_augmentations``: the same
    plans as one by one, for a fraction of the cost); then each JPEG is decoded as small as its plan allows
    (module docstring) and rendered. A member that does not match what shard wrote gives its ``_Corrupt`` in
    its place; the others are unaffected.
    """
    outcomes: dict[int, Sample | _Corrupt] = {}
    parsed: list[tuple[int, _Record, torch.Generator]] = []  # (position, record, generator)
    for position, ((_, meta_bytes), generator) in enumerate(zip(members, generators, strict=True)):
        try:
            parsed.append((position, _parse_record(meta_bytes, num_classes), generator))
        except _Corrupt as error:
            outcomes[position] = error
    records = [record for _, record, _ in parsed]
    boxes = [(r.boxes_px / torch.tensor([r.width, r.height] * 2, dtype=torch.float32)).clamp_(0.0, 1.0)
             for r in records]  # [G, 4] normalised each
    plans = plan_augmentations([(r.width, r.height) for r in records], boxes, [r.labels for r in records],
                               [r.difficult for r in records], options=augment, generators=[g for *_, g in parsed])
    for (position, record, _), plan in zip(parsed, plans, strict=True):
        reduction = decode_reduction(plan, image_size)
        try:
            pixels = _pixels(members[position][0], record.width, record.height, reduction)  # [3, ceil(h/r), ceil(w/r)]
        except _Corrupt as error:
            outcomes[position] = error
            continue
        image = render_augmentation(pixels, plan, image_size, reduction=reduction)
        outcomes[position] = Sample(image, plan.boxes, plan.labels, plan.difficult)
    return [outcomes[position] for position in range(len(members))]


def train_sample(jpg: bytes, meta_bytes: bytes, num_classes: int, *, image_size: int, augment: AugmentOptions,
                 generator: torch.Generator) -> Sample:
    """One augmented training sample from its shard members (``train_samples`` of one); ``_Corrupt`` for
    anything that does not match what shard wrote."""
    sample, = train_samples([(jpg, meta_bytes)], num_classes, image_size=image_size, augment=augment,
                            generators=[generator])
    if isinstance(sample, _Corrupt):
        raise sample
    return sample


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

    def __init__(self, reader: _ShardReader, *, start: int, count: int, rank: int, world_size: int, batch_size: int,
                 image_size: int, augment: AugmentOptions, seed: int, num_classes: int) -> None:
        self.reader, self.start, self.count = reader, start, count
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.image_size, self.augment, self.seed = image_size, augment, seed
        self.num_classes = num_classes
        self._epoch_batches: tuple[int, list[np.ndarray]] | None = None  # the last epoch's batches, cached

    def batches_of(self, epoch: int) -> list[np.ndarray]:
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            batches = rank_batches(len(self.reader), seed=self.seed, epoch=epoch, rank=self.rank,
                                   world_size=self.world_size, batch_size=self.batch_size)  # fmt: skip
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
        outcomes: dict[int, Sample | _Corrupt] = {}  # by position
        readable, members, generators = [], [], []
        for position, index in positions:
            try:
                members.append(self.reader.read(index))
            except _Corrupt as error:
                outcomes[position] = error
                continue
            readable.append(position)
            key = self.reader.locations[index][1].key
            generators.append(torch.Generator().manual_seed(sample_seed(self.seed, epoch, key)))
        made = train_samples(members, self.num_classes, image_size=self.image_size, augment=self.augment,
                             generators=generators)  # fmt: skip
        outcomes.update(zip(readable, made, strict=True))
        samples, bad = [], 0
        for position, index in positions:
            if isinstance(outcomes[position], _Corrupt):
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

    def __init__(self, manifest: ShardManifest, *, split: str, rank: int, world_size: int, batch_size: int,
                 image_size: int, augment: AugmentOptions, seed: int, epoch: int, num_workers: int,
                 skip_batches: int = 0, epochs: int = 1, max_batches: int | None = None,
                 multiprocessing_context: str | None = None, pin_memory: bool = False) -> None:
        if not isinstance(augment, AugmentOptions):
            raise TypeError(f"train_loader: expected augment as an AugmentOptions, got {type(augment).__name__}")
        if num_workers < 0:
            raise ValueError(f"train_loader: expected num_workers >= 0, got {num_workers}")
        if epoch < 0 or epochs < 1 or (max_batches is not None and max_batches < 0):
            raise ValueError(f"train_loader: expected epoch >= 0, epochs >= 1 and max_batches >= 0, got epoch {epoch}, "
                             f"epochs {epochs}, max_batches {max_batches}")
        self.manifest, self.epoch, self.num_workers = manifest, epoch, num_workers
        self.loader_options = {"multiprocessing_context": multiprocessing_context, "pin_memory": pin_memory}
        self.reader = _ShardReader(manifest.root, manifest.split_shards(split))
        self.batches = rank_batches(len(self.reader), seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                    batch_size=batch_size)  # fmt: skip
        if not 0 <= skip_batches <= len(self.batches):
            raise ValueError(f"train_loader: expected 0 <= skip_batches <= {len(self.batches)} (batches per "
                             f"epoch), got {skip_batches}")
        self.skip_batches = skip_batches
        count = epochs * len(self.batches) - skip_batches
        self.remaining = count if max_batches is None else min(count, max_batches)
        self.dataset = _TrainBatches(self.reader, start=epoch * len(self.batches) + skip_batches, count=self.remaining,
                                     rank=rank, world_size=world_size, batch_size=batch_size, image_size=image_size,
                                     augment=augment, seed=seed, num_classes=len(manifest.classes))  # fmt: skip

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[TrainBatch]:
        return _iterate(self.dataset, self.num_workers, **self.loader_options)


def train_loader(shards: str, *, rank: int, world_size: int, batch_size: int, image_size: int,
                 augment: AugmentOptions, seed: int, epoch: int, num_workers: int, skip_batches: int = 0,
                 epochs: int = 1, max_batches: int | None = None, split: str = "train", verify: bool = False,
                 multiprocessing_context: str | None = None, pin_memory: bool = False) -> TrainLoader:
    """Training batches of one rank: one epoch, or ``epochs`` in one stream (see the module docstring and
    ``TrainLoader``).

    ``verify=True`` recomputes every shard's sha256 first (``load_manifest``); by default only the shard
    sizes are checked, as the driver is expected to have verified once before training.
    ``multiprocessing_context`` and ``pin_memory`` (for GPU training) go to the DataLoader.
    """
    manifest = load_manifest(shards, verify=verify)
    return TrainLoader(manifest, split=split, rank=rank, world_size=world_size, batch_size=batch_size,
                       image_size=image_size, augment=augment, seed=seed, epoch=epoch, num_workers=num_workers,
                       skip_batches=skip_batches, epochs=epochs, max_batches=max_batches,
                       multiprocessing_context=multiprocessing_context, pin_memory=pin_memory)


# ------------------------------------------------------------------------------------- evaluation
class _EvalBatches(IterableDataset):
    def __init__(self, reader: _ShardReader, batch_size: int, image_size: int, num_classes: int) -> None:
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
            except _Corrupt as error:
                raise ShardError(f"{self.reader.describe(index)}: {error}; evaluation needs every sample "
                                 "(re-run the shard stage)") from None
            images.append(eval_transform(decoded.image, self.image_size))
            keys.append(str(decoded.meta["id"]))
            sizes.append((decoded.image.shape[2], decoded.image.shape[1]))
            boxes.append(decoded.boxes_px)
            labels.append(decoded.labels)
            difficult.append(decoded.difficult)
        return EvalBatch(torch.stack(images), keys, torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
                         boxes, labels, difficult)


class EvalLoader:
    """Every sample of a split exactly once, in manifest order, in batches of ``batch_size`` (last smaller)."""

    def __init__(self, manifest: ShardManifest, *, split: str, batch_size: int, image_size: int,
                 num_workers: int, multiprocessing_context: str | None = None, pin_memory: bool = False) -> None:
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"eval_loader: expected batch_size >= 1 and num_workers >= 0, got {batch_size}, "
                             f"{num_workers}")
        self.manifest, self.num_workers = manifest, num_workers
        self.loader_options = {"multiprocessing_context": multiprocessing_context, "pin_memory": pin_memory}
        self.dataset = _EvalBatches(_ShardReader(manifest.root, manifest.split_shards(split)), batch_size,
                                    image_size, len(manifest.classes))

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def num_samples(self) -> int:
        return len(self.dataset.reader)

    def __iter__(self) -> Iterator[EvalBatch]:
        return _iterate(self.dataset, self.num_workers, **self.loader_options)


def eval_loader(shards: str, *, split: str = "val", batch_size: int, image_size: int, num_workers: int,
                verify: bool = False, multiprocessing_context: str | None = None,
                pin_memory: bool = False) -> EvalLoader:
    """Evaluation batches: every sample of ``split`` once, in a fixed order, with source id, size and GT."""
    manifest = load_manifest(shards, verify=verify)
    return EvalLoader(manifest, split=split, batch_size=batch_size, image_size=image_size, num_workers=num_workers,
                      multiprocessing_context=multiprocessing_context, pin_memory=pin_memory)

