"""Which augmentation steps run, and the constants of the original SSD chain they use."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Crop options, drawn with equal probability. None: keep the whole image; a number: the crop must have
# IoU >= it with at least one box; -inf: any crop ("no constraint" in the paper).
CROP_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -math.inf)
CROP_TRIALS = 50  # random crops tried per image before giving up (original)
CROP_MIN_SCALE = 0.3  # smallest crop side / canvas side (original)
CROP_ASPECT_RANGE = (0.5, 2.0)  # allowed crop height / width in pixels (original)


@dataclass(frozen=True)
class AugmentOptions:
    """Which augmentation steps :func:`ssd_core.augment.train_transform` applies.

    Attributes:
        photometric: brightness, contrast, saturation, hue in the original's random order.
        expand: zoom out onto a mean-coloured canvas with probability 1/2.
        expand_max_ratio: largest canvas side / image side (original: 4).
        crop: min-IoU random crop.
        flip: horizontal flip with probability 1/2.
        channel_swap: the original's random channel permutation (off: it changes colour identity).
    """

    photometric: bool = True
    expand: bool = True
    expand_max_ratio: float = 4.0
    crop: bool = True
    flip: bool = True
    channel_swap: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.expand_max_ratio) and self.expand_max_ratio >= 1.0):
            got = self.expand_max_ratio
            raise ValueError(f"AugmentOptions.expand_max_ratio: expected a finite number >= 1, got {got}")
