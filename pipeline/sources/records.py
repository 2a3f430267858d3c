"""Source-neutral records: ``Candidate`` (what an annotation file says) -> ``IndexRecord`` (what we keep).

The index (``{split}.jsonl`` beside ``classes.json``) holds one JSON object per line::

    {"id": "raccoon/raccoon-1", "image": "../../shared/datasets/raccoon/images/raccoon-1.jpg",
     "width": 650, "height": 417, "boxes": [[80.0, 87.0, 522.0, 408.0]], "labels": [1],
     "difficult": [false], "reencode": false}

- ``image``: path relative to the folder holding the index (so the index survives moving the repo).
- ``width``/``height``: pixels of the upright image (after EXIF orientation).
- ``boxes``: xyxy pixels of the upright image, continuous coordinates: a box covering the whole image
  is ``[0, 0, width, height]``.
- ``labels``: 1-based; ``classes.json`` lists the names, label ``i + 1`` is ``classes[i]``.
- ``difficult``: VOC's difficult flag; COCO ``iscrowd`` boxes are also marked difficult, so that matching
  and VOC-style metrics ignore them.
- ``reencode``: the stored file is not an upright RGB JPEG, so ``shard`` decodes, orients, converts to RGB
  and re-encodes it instead of copying the bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts.atomic_write import write_text_atomic
from pipeline.sources.images import ImageRejected, inspect_image, orient_boxes
from pipeline.sources.report import PrepareReport

MIN_BOX_SIDE_PX = 1.0  # a box narrower or shorter than one pixel after clipping is degenerate
SPLITS = ("train", "val", "test")  # test: held out from selection, scored by evaluate (may be empty)


class PrepareError(ValueError):
    """The stage cannot go on (a strict class check, too many bad images, no data); the message says why."""


@dataclass(frozen=True)
class RawObject:
    """One annotated object as the source states it, before validation."""

    name: str | None  # class name; None when missing
    box_px: tuple[float, float, float, float] | None  # xyxy pixels of the stored image; None when unparseable
    difficult: bool = False
    problem: str = ""  # a reject reason found while parsing, e.g. "box_malformed"


@dataclass(frozen=True)
class Candidate:
    """One image with its annotation, as a source reader found it."""

    id: str  # unique source id, e.g. "VOC2007/000005"
    split: str  # "train" | "val" | "test"
    image_path: Path
    where: str  # the file to name in the log (annotation file, or the image for synthetic data)
    declared_size: tuple[int, int] | None  # (width, height) the annotation claims for the stored image
    objects: tuple[RawObject, ...] = ()


@dataclass(frozen=True)
class IndexRecord:
    id: str
    image: Path  # absolute in memory; relative to the index folder on disk
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)  # [G, 4] xyxy pixels, upright image
    labels: list[int] = field(default_factory=list)  # [G] 1..C-1
    difficult: list[bool] = field(default_factory=list)  # [G]
    reencode: bool = False

    def to_json(self, index_dir: Path) -> str:
        data = {
            "id": self.id,
            "image": Path(os.path.relpath(self.image, index_dir)).as_posix(),
            "width": self.width,
            "height": self.height,
            "boxes": self.boxes,
            "labels": self.labels,
            "difficult": self.difficult,
            "reencode": self.reencode,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str, index_dir: Path) -> IndexRecord:
        data = json.loads(line)
        return cls(
            id=data["id"],
            image=(index_dir / data["image"]).resolve(),
            width=int(data["width"]),
            height=int(data["height"]),
            boxes=[[float(v) for v in box] for box in data["boxes"]],
            labels=[int(v) for v in data["labels"]],
            difficult=[bool(v) for v in data["difficult"]],
            reencode=bool(data["reencode"]),
        )


# ------------------------------------------------------------------------------------------ classes
def resolve_classes(
    candidates: Iterable[Candidate], configured: Sequence[str], source_classes: Sequence[str] | None, strict: bool
) -> list[str]:
    """Class names in label order: ``data.classes`` if given, else the source's own list, else sorted names seen.

    Raises:
        PrepareError: with ``strict`` and ``configured`` given, for the first name outside it (file named).
    """
    if configured:
        if len(set(configured)) != len(configured):
            raise PrepareError(f"data.classes: names must be unique, got {list(configured)}")
        if strict:
            allowed = set(configured)
            for candidate in candidates:
                for obj in candidate.objects:
                    if obj.name is not None and obj.name not in allowed:
                        raise PrepareError(
                            f"{candidate.where}: class {obj.name!r} is not in data.classes {list(configured)} "
                            "(data.strict_classes=true; set it false to count and drop such boxes instead)"
                        )
        return list(configured)
    if source_classes is not None:
        return list(source_classes)
    return sorted({obj.name for c in candidates for obj in c.objects if obj.name is not None})


# ----------------------------------------------------------------------------------------- validate
def finalize(
    candidate: Candidate, labels: dict[str, int], report: PrepareReport, *, max_pixels: int
) -> IndexRecord | None:
    """Validate one candidate into an index record, counting every dropped or corrected item in ``report``.

    Order: the image is inspected (a rejected image takes all its boxes with it); parse problems and
    unknown classes drop boxes; a size the annotation misstates is corrected from the image; non-finite
    and inverted boxes are dropped; the rest are moved by the EXIF orientation and clipped to the image,
    and those thinner than ``MIN_BOX_SIDE_PX`` after clipping are dropped as degenerate.
    Returns None when the image is rejected.
    """
    where = candidate.where
    try:
        info = inspect_image(candidate.image_path, max_pixels=max_pixels)
    except ImageRejected as rejected:
        report.reject_image(
            f"{where} -> {candidate.image_path}", rejected.reason, rejected.detail, boxes=len(candidate.objects)
        )
        return None

    objects: list[RawObject] = []
    for obj in candidate.objects:
        if obj.problem:
            report.reject_boxes(where, obj.problem)
        elif obj.name is None or obj.box_px is None:
            report.reject_boxes(where, "box_malformed")
        elif obj.name not in labels:
            report.reject_boxes(where, "unknown_class", detail=repr(obj.name))
        else:
            objects.append(obj)

    raw_size = (info.raw_width, info.raw_height)
    if candidate.declared_size is not None and tuple(candidate.declared_size) != raw_size:
        report.fix_image(where, "size_mismatch", f"annotation says {candidate.declared_size}, image is {raw_size}")
    if info.orientation != 1:
        report.fix_image(where, "exif_orientation", f"EXIF orientation {info.orientation}")
    if info.mode != "RGB":
        report.fix_image(where, "converted_to_rgb", f"mode {info.mode}")

    boxes = np.asarray([obj.box_px for obj in objects], dtype=np.float64).reshape(-1, 4)  # [G, 4]
    keep = np.ones(len(objects), dtype=bool)
    nonfinite = ~np.isfinite(boxes).all(axis=1)
    inverted = ~nonfinite & ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))
    report.reject_boxes(where, "box_nonfinite", int(nonfinite.sum()))
    report.reject_boxes(where, "box_inverted", int(inverted.sum()))
    keep &= ~nonfinite & ~inverted

    boxes = np.where(keep[:, None], boxes, 0.0)
    boxes = orient_boxes(boxes, info.orientation, info.raw_width, info.raw_height)
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0.0, info.width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0.0, info.height)
    degenerate = keep & (
        (clipped[:, 2] - clipped[:, 0] < MIN_BOX_SIDE_PX) | (clipped[:, 3] - clipped[:, 1] < MIN_BOX_SIDE_PX)
    )
    report.reject_boxes(where, "box_degenerate", int(degenerate.sum()), detail="thinner than 1 px after clipping")
    keep &= ~degenerate
    was_clipped = keep & (clipped != boxes).any(axis=1)
    report.fix_boxes(where, "box_clipped", int(was_clipped.sum()))

    kept = [obj for obj, k in zip(objects, keep, strict=True) if k]
    report.keep_image(candidate.split, [obj.name for obj in kept])
    return IndexRecord(
        id=candidate.id,
        image=Path(candidate.image_path).resolve(),
        width=info.width,
        height=info.height,
        boxes=[[float(v) for v in box] for box in clipped[keep]],
        labels=[labels[obj.name] for obj in kept],
        difficult=[bool(obj.difficult) for obj in kept],
        reencode=info.needs_reencode,
    )


def box_from_values(values: Sequence[Any]) -> tuple[float, float, float, float] | None:
    """Four numbers -> a float tuple (non-finite values pass through, to be counted later); else None."""
    try:
        x1, y1, x2, y2 = (float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return x1, y1, x2, y2


# ------------------------------------------------------------------------------------------ on disk
def write_index(out_dir: Path, records_by_split: dict[str, list[IndexRecord]], classes: list[str]) -> None:
    """Write ``{split}.jsonl`` (records in the given order) and ``classes.json`` atomically into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index_dir = out_dir.resolve()
    for split in SPLITS:
        records = records_by_split.get(split, [])
        write_text_atomic(out_dir / f"{split}.jsonl", "".join(r.to_json(index_dir) + "\n" for r in records))
    write_text_atomic(out_dir / "classes.json", json.dumps(classes, indent=1) + "\n")


def read_index(index_dir: Path, split: str) -> list[IndexRecord]:
    """Records of ``split`` from ``index_dir/{split}.jsonl`` (an empty list when the split is empty)."""
    path = index_dir / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file; run `python -m pipeline prepare` first")
    base = index_dir.resolve()
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(IndexRecord.from_json(line, base))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: malformed index line ({error})") from None
    return records


def read_classes(index_dir: Path) -> list[str]:
    path = index_dir / "classes.json"
    classes = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: expected a JSON list of class names, got {classes!r}")
    return classes
