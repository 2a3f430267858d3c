"""Counted outcomes of ``prepare``: each image and box is kept or rejected for a named reason.

The counts add up by construction (every entry point increments "in" together with exactly one of
"kept" / a reject reason), and ``to_dict`` checks it again before the report is written::

    images.in == images.kept + sum(images.rejected.values())
    boxes.in  == boxes.kept  + sum(boxes.rejected.values())

Corrections (a wrong size in the XML, EXIF rotation, colour conversion, clipped boxes) keep the image
or box and are counted separately. Each affected file is named once per event in the log.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class PrepareReport:
    images_in: int = 0
    images_kept: int = 0
    boxes_in: int = 0
    boxes_kept: int = 0
    image_rejects: Counter = field(default_factory=Counter)  # reason -> images
    box_rejects: Counter = field(default_factory=Counter)  # reason -> boxes
    image_fixes: Counter = field(default_factory=Counter)  # reason -> images kept after a correction
    box_fixes: Counter = field(default_factory=Counter)  # reason -> boxes kept after a correction
    notes: Counter = field(default_factory=Counter)  # informational counts outside in/kept/rejected
    split_images: Counter = field(default_factory=Counter)  # split -> images kept
    split_boxes: Counter = field(default_factory=Counter)  # split -> boxes kept
    class_boxes: Counter = field(default_factory=Counter)  # class name -> boxes kept

    def reject_image(self, where: str, reason: str, detail: str = "", *, boxes: int = 0) -> None:
        """One image (and its ``boxes`` not yet counted) is rejected for ``reason``."""
        self.images_in += 1
        self.image_rejects[reason] += 1
        if boxes:
            self.reject_boxes(where, "image_rejected", boxes, log=False)
        logger.warning("rejected image %s: %s%s", where, reason, f" ({detail})" if detail else "")

    def reject_boxes(self, where: str, reason: str, count: int = 1, detail: str = "", *, log: bool = True) -> None:
        """``count`` boxes are dropped for ``reason``."""
        if count <= 0:
            return
        self.boxes_in += count
        self.box_rejects[reason] += count
        if log:
            logger.warning("dropped %d box(es) in %s: %s%s", count, where, reason, f" ({detail})" if detail else "")

    def fix_image(self, where: str, reason: str, detail: str = "") -> None:
        self.image_fixes[reason] += 1
        logger.info("corrected %s: %s%s", where, reason, f" ({detail})" if detail else "")

    def fix_boxes(self, where: str, reason: str, count: int, detail: str = "") -> None:
        if count > 0:
            self.box_fixes[reason] += count
            logger.info("corrected %d box(es) in %s: %s%s", count, where, reason, f" ({detail})" if detail else "")

    def note(self, reason: str, count: int = 1) -> None:
        self.notes[reason] += count

    def keep_image(self, split: str, class_names: list[str]) -> None:
        """One image is kept with the boxes of ``class_names`` (one name per kept box)."""
        self.images_in += 1
        self.images_kept += 1
        self.boxes_in += len(class_names)
        self.boxes_kept += len(class_names)
        self.split_images[split] += 1
        self.split_boxes[split] += len(class_names)
        self.class_boxes.update(class_names)

    @property
    def images_rejected(self) -> int:
        return sum(self.image_rejects.values())

    @property
    def boxes_rejected(self) -> int:
        return sum(self.box_rejects.values())

    @property
    def bad_fraction(self) -> float:
        """Rejected images / images in (0 when nothing came in)."""
        return self.images_rejected / self.images_in if self.images_in else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON written to ``reports/prepare.json`` (a DVC metric); sorted keys, plain ints."""
        assert self.images_in == self.images_kept + self.images_rejected, "image counts do not add up"
        assert self.boxes_in == self.boxes_kept + self.boxes_rejected, "box counts do not add up"
        return {
            "images": {
                "in": self.images_in,
                "kept": self.images_kept,
                "rejected": self.images_rejected,
                "rejected_by_reason": dict(sorted(self.image_rejects.items())),
                "corrected_by_reason": dict(sorted(self.image_fixes.items())),
            },
            "boxes": {
                "in": self.boxes_in,
                "kept": self.boxes_kept,
                "rejected": self.boxes_rejected,
                "rejected_by_reason": dict(sorted(self.box_rejects.items())),
                "corrected_by_reason": dict(sorted(self.box_fixes.items())),
            },
            "splits": {
                split: {"images": self.split_images[split], "boxes": self.split_boxes[split]}
                for split in sorted(self.split_images)
            },
            "classes": dict(sorted(self.class_boxes.items())),
            "notes": dict(sorted(self.notes.items())),
            "bad_fraction": round(self.bad_fraction, 6),
        }

    def summary(self) -> str:
        """One line for the end of the stage."""
        splits = ", ".join(f"{s} {self.split_images[s]}" for s in sorted(self.split_images)) or "none"
        reasons = ", ".join(f"{r} {n}" for r, n in self.image_rejects.most_common()) or "none"
        return (
            f"prepare: {self.images_kept}/{self.images_in} images kept ({splits}), "
            f"{self.boxes_kept}/{self.boxes_in} boxes kept; rejected images by reason: {reasons}"
        )
