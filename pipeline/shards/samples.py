"""One shard sample's two members (JPEG bytes, JSON record) -> checked record, decoded image, training sample.

The JSON record (written by ``pipeline.shards.write``) is checked field by field before anything is
decoded (``parse_record``): a record put into a shard by hand or damaged on disk cannot make a worker
allocate a huge image or emit boxes outside the image. Decoding is libjpeg-turbo through simplejpeg
(``pipeline.shards.jpeg``: the same pixels as PIL, decoded straight into the array that becomes the
tensor); the JPEG header must match the record's size before any pixel is decoded.

Training samples use what the shard format gives for free: the record carries the stored image's size, so
the whole augmentation is planned (every random draw, the crop window, the output boxes) before a pixel is
decoded, for the whole batch at once (``ssd_core.augment.plan_augmentations``: the per-sample plans,
vectorised). When the window is at least 2, 4 or 8 times the output side on both axes, the JPEG is decoded
at 1/2, 1/4 or 1/8 of its size by the decoder's DCT scaling (``decode_reduction``), which skips most of the
inverse-DCT and colour work, and the window is sampled from the smaller image
(``render_augmentation(..., reduction=r)``; close to, not bit-equal to, the full-size result: see
``ssd_core.augment.render``). Orientation is not touched here: the shard stage stores every image as an
upright RGB JPEG (EXIF orientation applied and dropped), and the record's size and boxes are in that frame.

Anything that does not match what the shard stage wrote raises (or, per sample, returns)
``CorruptSample``; the loaders decide what that means (skip and count, or refuse).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.shards.jpeg import JpegError, decode_reduction, decode_rgb
from pipeline.shards.reader import CorruptSample
from ssd_core.augment import AugmentOptions, Sample, plan_augmentations, render_augmentation

MAX_RECORD_SIDE = 65_535  # the largest side a JPEG can have: no record of a real sample says more
# Pixels one sample may have (~0.8 GB as RGB): 3x the default prepare.max_image_pixels, so no sample prepare
# lets through by default comes near it, while a record (and JPEG) put into a shard by hand cannot make a
# worker allocate what a 65,535 x 65,535 image would need (~12.9 GB).
MAX_SAMPLE_PIXELS = 1 << 28


class SampleRecord(NamedTuple):
    """A checked JSON record: its fields as read, the stored image's size, and its objects as tensors."""

    meta: dict[str, Any]
    width: int
    height: int
    boxes_px: Tensor  # float32 [G, 4] xyxy pixels of the stored image
    labels: Tensor  # int64 [G], 1..C-1
    difficult: Tensor  # bool [G]


class DecodedSample(NamedTuple):
    """A sample at full size, as evaluation sees it."""

    image: Tensor  # uint8 [3, H, W]
    meta: dict[str, Any]
    boxes_px: Tensor  # float32 [G, 4] xyxy pixels
    labels: Tensor  # int64 [G]
    difficult: Tensor  # bool [G]


def _numbers(values: Any, dtype: type, kinds: str, shape: tuple[int, ...]) -> np.ndarray:
    """A JSON list as a NumPy array of ``dtype`` and ``shape``; TypeError unless its items are of ``kinds``."""
    array = np.asarray(values)
    if array.size and array.dtype.kind not in kinds:
        raise TypeError(f"expected numbers ({kinds}), got {array.dtype}")
    return array.astype(dtype).reshape(shape)


def parse_record(meta_bytes: bytes, num_classes: int) -> SampleRecord:
    """The JSON member, checked field by field; ``CorruptSample`` for anything that does not match what shard
    wrote.

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
        raise CorruptSample(f"bad JSON record ({type(error).__name__}: {error})") from None
    if not isinstance(sample_id, str):
        raise CorruptSample(f"JSON record: id must be a string, got {type(sample_id).__name__}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_RECORD_SIDE for v in (width, height)):
        raise CorruptSample(
            f"JSON record: width and height must be ints in 1..{MAX_RECORD_SIDE}, got {width!r} x {height!r}"
        )
    if width * height > MAX_SAMPLE_PIXELS:
        raise CorruptSample(
            f"JSON record: {width} x {height} = {width * height} pixels, more than "
            f"{MAX_SAMPLE_PIXELS} (MAX_SAMPLE_PIXELS)"
        )
    if not (len(boxes) == len(labels) == len(difficult)) or not np.isfinite(boxes).all():
        raise CorruptSample("JSON record: boxes, labels and difficult disagree in length or hold non-finite values")
    outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if (outside | inverted).any():
        row = int(np.flatnonzero(outside | inverted)[0])
        raise CorruptSample(
            f"JSON record: box {row} {boxes[row].tolist()} is not inside the {width} x {height} "
            "image (0 <= x1 <= x2 <= width, 0 <= y1 <= y2 <= height)"
        )
    if len(labels) and (labels.min() < 1 or labels.max() > num_classes):
        raise CorruptSample(f"JSON record: labels outside 1..{num_classes}")
    if len(difficult) and (difficult.min() < 0 or difficult.max() > 1):
        raise CorruptSample("JSON record: difficult flags must be false/true (or 0/1)")
    return SampleRecord(
        meta,
        width,
        height,
        torch.from_numpy(boxes),
        torch.from_numpy(labels),
        torch.from_numpy(difficult.astype(np.bool_)),
    )


def _pixels(jpg: bytes, width: int, height: int, reduction: int = 1) -> Tensor:
    """Decode the JPEG member at ``1 / reduction`` -> uint8 ``[3, H', W']`` (HWC memory, its own storage).
    The header must give the record's size (checked before decoding: no bomb, no tampered member)."""
    try:
        return torch.from_numpy(decode_rgb(jpg, width=width, height=height, reduction=reduction)).permute(2, 0, 1)
    except JpegError as error:
        raise CorruptSample(str(error)) from None


def decode_sample(jpg: bytes, meta_bytes: bytes, num_classes: int) -> DecodedSample:
    """Decode one sample's members at full size (image uint8 ``[3, H, W]``, boxes in its pixels);
    ``CorruptSample`` for anything that does not match what shard wrote."""
    record = parse_record(meta_bytes, num_classes)
    pixels = _pixels(jpg, record.width, record.height)
    return DecodedSample(pixels, record.meta, record.boxes_px, record.labels, record.difficult)


def train_samples(
    members: Sequence[tuple[bytes, bytes]],
    num_classes: int,
    *,
    image_size: int,
    augment: AugmentOptions,
    generators: Sequence[torch.Generator],
    max_boxes: int | None = None,
) -> list[Sample | CorruptSample]:
    """Augmented training samples from their shard members (jpg, json), one generator each.

    The records are parsed first and the whole batch is planned at once (``plan_augmentations``: the same
    plans as one by one, for a fraction of the cost); then each JPEG is decoded as small as its plan allows
    (module docstring) and rendered. A member that does not match what shard wrote gives its ``CorruptSample``
    in its place; the others are unaffected, and so does a record with more than ``max_boxes`` boxes
    (``train.max_boxes``, see ``pipeline.shards.batch``).

    Returns one ``Sample`` (image uint8 ``[3, image_size, image_size]``, boxes float32 ``[G', 4]`` xyxy
    normalised) or ``CorruptSample`` per member, in the members' order.
    """
    outcomes: dict[int, Sample | CorruptSample] = {}
    parsed: list[tuple[int, SampleRecord, torch.Generator]] = []  # (position, record, generator)
    for position, ((_, meta_bytes), generator) in enumerate(zip(members, generators, strict=True)):
        try:
            record = parse_record(meta_bytes, num_classes)
            if max_boxes is not None and len(record.labels) > max_boxes:
                raise CorruptSample(f"{len(record.labels)} boxes, more than train.max_boxes={max_boxes}")
            parsed.append((position, record, generator))
        except CorruptSample as error:
            outcomes[position] = error
    records = [record for _, record, _ in parsed]
    boxes = [
        (r.boxes_px / torch.tensor([r.width, r.height] * 2, dtype=torch.float32)).clamp_(0.0, 1.0) for r in records
    ]  # [G, 4] normalised each
    plans = plan_augmentations(
        [(r.width, r.height) for r in records],
        boxes,
        [r.labels for r in records],
        [r.difficult for r in records],
        options=augment,
        generators=[g for *_, g in parsed],
    )
    for (position, record, _), plan in zip(parsed, plans, strict=True):
        reduction = decode_reduction(plan, image_size)
        try:
            pixels = _pixels(members[position][0], record.width, record.height, reduction)  # [3, ceil(h/r), ceil(w/r)]
        except CorruptSample as error:
            outcomes[position] = error
            continue
        image = render_augmentation(pixels, plan, image_size, reduction=reduction)
        outcomes[position] = Sample(image, plan.boxes, plan.labels, plan.difficult)
    return [outcomes[position] for position in range(len(members))]


def train_sample(
    jpg: bytes,
    meta_bytes: bytes,
    num_classes: int,
    *,
    image_size: int,
    augment: AugmentOptions,
    generator: torch.Generator,
) -> Sample:
    """One augmented training sample from its shard members (``train_samples`` of one); ``CorruptSample`` for
    anything that does not match what shard wrote."""
    (sample,) = train_samples(
        [(jpg, meta_bytes)], num_classes, image_size=image_size, augment=augment, generators=[generator]
    )
    if isinstance(sample, CorruptSample):
        raise sample
    return sample
