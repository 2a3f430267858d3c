"""Default boxes ("priors"): the fixed grid of reference boxes that SSD regresses from.

For source level k with a ``f_k x f_k`` feature map and stride ``step_k`` (pixels), the location
(i = row, j = column) has its centre at ``((j + 0.5) * step_k / S, (i + 0.5) * step_k / S)`` for an
``S x S`` input: the original Caffe ``PriorBox`` layer. With ``step_k = S / f_k`` this is the paper's
``((j + 0.5) / f_k, (i + 0.5) / f_k)``. The Caffe SSD300 rounds the steps of its 38, 19, 10 and 5 maps
to 8, 16, 32 and 64 pixels (300 / f_k would be 7.89, 15.8, 30 and 60), which shifts those centres
slightly (the 3x3 and 1x1 maps' steps 100 and 300 are exact); we reproduce it so converted weights
line up.

At each location the boxes are, in this order (the original model's order):
1. a square of side ``s_k = min_size_k / S``;
2. if the level has a max size, a square of side ``sqrt(s_k * s'_k)`` with ``s'_k = max_size_k / S``;
3. for each configured aspect ratio ``ar`` (values > 1, e.g. 2 or 3): ``(s_k*sqrt(ar), s_k/sqrt(ar))``
   then its flip ``(s_k/sqrt(ar), s_k*sqrt(ar))``.
Levels come in order, and inside a level locations go row by row, column by column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class PriorSpec:
    """Everything that defines the prior grid of one SSD model.

    Attributes:
        image_size: input side S in pixels (the model takes ``S x S`` images).
        feature_maps: side ``f_k`` of each square source feature map, e.g. (38, 19, 10, 5, 3, 1).
        steps: stride of each level in input pixels, e.g. (8, 16, 32, 64, 100, 300).
        min_sizes: side of the level's small square box, in input pixels.
        max_sizes: side used for the extra square ``sqrt(min * max)``, in input pixels, one per level.
        aspect_ratios: per level, the ratios > 1 to add with their flips, e.g. ((2,), (2, 3), ...).
        clip: clamp the priors' (cx, cy, w, h) to [0, 1], as some ports do. The Caffe models do not.
    """

    image_size: int
    feature_maps: tuple[int, ...]
    steps: tuple[float, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    clip: bool = False

    def __post_init__(self) -> None:
        levels = len(self.feature_maps)
        if levels == 0:
            raise ValueError("PriorSpec.feature_maps: expected at least one level, got none")
        for name in ("steps", "min_sizes", "max_sizes", "aspect_ratios"):
            got = len(getattr(self, name))
            if got != levels:
                raise ValueError(f"PriorSpec.{name}: expected one entry per feature map ({levels}), got {got}")
        if self.image_size <= 0:
            raise ValueError(f"PriorSpec.image_size: expected a positive size, got {self.image_size}")
        for k, (fmap, step, lo, hi) in enumerate(
            zip(self.feature_maps, self.steps, self.min_sizes, self.max_sizes, strict=True)
        ):
            if fmap <= 0 or step <= 0 or lo <= 0:
                raise ValueError(
                    f"PriorSpec level {k}: feature map, step and min size must be positive, "
                    f"got feature_map={fmap}, step={step}, min_size={lo}"
                )
            if hi < lo:
                raise ValueError(f"PriorSpec level {k}: max_size {hi} is smaller than min_size {lo}")
        for k, ratios in enumerate(self.aspect_ratios):
            if any(r <= 1 for r in ratios):
                raise ValueError(
                    f"PriorSpec.aspect_ratios[{k}] = {tuple(ratios)}: give ratios > 1 only; "
                    "each ratio r adds r and its flip 1/r, and ratio 1 is always present"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (JSON-, YAML- and ``torch.load(weights_only=True)``-safe): what a model file,
        a checkpoint and the ONNX metadata record, so that loading rebuilds exactly these priors."""
        return {
            "image_size": int(self.image_size),
            "feature_maps": [int(f) for f in self.feature_maps],
            "steps": [float(s) for s in self.steps],
            "min_sizes": [float(s) for s in self.min_sizes],
            "max_sizes": [float(s) for s in self.max_sizes],
            "aspect_ratios": [[float(r) for r in ratios] for ratios in self.aspect_ratios],
            "clip": bool(self.clip),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PriorSpec:
        """Inverse of ``to_dict``; the spec's own checks run on the values.

        Raises:
            ValueError: a field is missing, unknown or not numbers of the right nesting (field named).
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"PriorSpec.from_dict: expected a mapping, got {type(values).__name__}")
        names = ("image_size", "feature_maps", "steps", "min_sizes", "max_sizes", "aspect_ratios", "clip")
        missing, unknown = [n for n in names if n not in values], sorted(set(values) - set(names))
        if missing or unknown:
            raise ValueError(f"PriorSpec.from_dict: missing fields {missing}, unknown fields {unknown}")
        try:
            return cls(
                image_size=_integer(values["image_size"]),
                feature_maps=tuple(_integer(f) for f in values["feature_maps"]),
                steps=tuple(_number(s) for s in values["steps"]),
                min_sizes=tuple(_number(s) for s in values["min_sizes"]),
                max_sizes=tuple(_number(s) for s in values["max_sizes"]),
                aspect_ratios=tuple(tuple(_number(r) for r in ratios) for ratios in values["aspect_ratios"]),
                clip=_flag(values["clip"]),
            )
        except TypeError as error:
            raise ValueError(f"PriorSpec.from_dict: {error}") from None

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """A_k per level: two squares plus two boxes (ar, 1/ar) per aspect ratio."""
        return tuple(2 + 2 * len(ratios) for ratios in self.aspect_ratios)

    @property
    def num_priors(self) -> int:
        """P, the total number of priors."""
        return sum(f * f * a for f, a in zip(self.feature_maps, self.boxes_per_location, strict=True))

    @classmethod
    def from_scales(
        cls,
        image_size: int,
        feature_maps: tuple[int, ...],
        aspect_ratios: tuple[tuple[float, ...], ...],
        *,
        steps: tuple[float, ...] | None = None,
        s_min: float = 0.2,
        s_max: float = 0.9,
        first_scale: float | None = None,
        clip: bool = False,
    ) -> PriorSpec:
        """Sizes from the paper's linear rule ``s_k = s_min + (s_max - s_min)(k - 1)/(m - 1)``.

        Each level's extra square uses the next level's scale ``s_{k+1}``; the last level extrapolates
        one more step, ``s_{m+1} = s_m + (s_max - s_min)/(m - 1)``.

        With ``first_scale`` (the original used 0.1 for conv4_3), level 1 gets that scale and pairs with
        ``s_min``, and the rule spreads ``s_min..s_max`` over the remaining ``m - 1`` levels.
        ``steps`` default to ``image_size / f_k``.
        """
        m = len(feature_maps)
        ruled = m - 1 if first_scale is not None else m
        if ruled < 2:
            raise ValueError(f"PriorSpec.from_scales: the linear rule needs at least 2 levels, got {ruled}")
        increment = (s_max - s_min) / (ruled - 1)
        scales = [s_min + increment * k for k in range(ruled + 1)]  # s_1 .. s_{m+1}
        if first_scale is not None:
            scales = [first_scale, *scales]
        return cls(
            image_size=image_size,
            feature_maps=tuple(feature_maps),
            steps=tuple(steps) if steps is not None else tuple(image_size / f for f in feature_maps),
            min_sizes=tuple(s * image_size for s in scales[:m]),
            max_sizes=tuple(s * image_size for s in scales[1 : m + 1]),
            aspect_ratios=tuple(tuple(r) for r in aspect_ratios),
            clip=clip,
        )


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"expected a finite number, got {value!r}")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


# The original Caffe models (weiliu89/caffe, ssd_pascal.py / ssd_coco.py and the released prototxts).
_SSD300_MAPS = (38, 19, 10, 5, 3, 1)
_SSD300_STEPS = (8, 16, 32, 64, 100, 300)
_SSD300_RATIOS = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))

SSD300_VOC = PriorSpec(
    image_size=300,
    feature_maps=_SSD300_MAPS,
    steps=_SSD300_STEPS,
    min_sizes=(30, 60, 111, 162, 213, 264),
    max_sizes=(60, 111, 162, 213, 264, 315),
    aspect_ratios=_SSD300_RATIOS,
)
SSD300_COCO = PriorSpec(
    image_size=300,
    feature_maps=_SSD300_MAPS,
    steps=_SSD300_STEPS,
    min_sizes=(21, 45, 99, 153, 207, 261),
    max_sizes=(45, 99, 153, 207, 261, 315),
    aspect_ratios=_SSD300_RATIOS,
)
SSD512_VOC = PriorSpec(
    image_size=512,
    feature_maps=(64, 32, 16, 8, 4, 2, 1),
    steps=(8, 16, 32, 64, 128, 256, 512),
    min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
    max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)
SSD512_COCO = PriorSpec(
    image_size=512,
    feature_maps=(64, 32, 16, 8, 4, 2, 1),
    steps=(8, 16, 32, 64, 128, 256, 512),
    min_sizes=(20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8),
    max_sizes=(51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)

PRIOR_PRESETS: dict[str, PriorSpec] = {
    "ssd300_voc": SSD300_VOC,
    "ssd300_coco": SSD300_COCO,
    "ssd512_voc": SSD512_VOC,
    "ssd512_coco": SSD512_COCO,
}


def generate_priors(spec: PriorSpec, dtype: torch.dtype = torch.float32) -> Tensor:
    """The prior grid of ``spec`` as ``Tensor[P, 4]`` (cx, cy, w, h), normalised to the input size.

    Computed in float64 and cast to ``dtype`` at the end, so float32 values match the Caffe layer.
    """
    size = float(spec.image_size)
    levels = []
    for fmap, step, lo, hi, ratios in zip(
        spec.feature_maps, spec.steps, spec.min_sizes, spec.max_sizes, spec.aspect_ratios, strict=True
    ):
        # Box sides at one location, in the original order: [A_k, 2] as (w, h).
        sides = [(lo, lo), (math.sqrt(lo * hi), math.sqrt(lo * hi))]
        for ar in ratios:
            root = math.sqrt(ar)
            sides += [(lo * root, lo / root), (lo / root, lo * root)]
        wh = torch.tensor(sides, dtype=torch.float64) / size  # [A, 2]

        centres = (torch.arange(fmap, dtype=torch.float64) + 0.5) * step / size  # [f]
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")  # [f, f]: rows (y) outer, columns inner
        xy = torch.stack((cx, cy), dim=-1).reshape(-1, 1, 2)  # [f*f, 1, 2]
        boxes = torch.cat(
            (xy.expand(-1, len(sides), 2), wh.unsqueeze(0).expand(fmap * fmap, -1, 2)), dim=-1
        )  # [f*f, A, 4]
        levels.append(boxes.reshape(-1, 4))
    priors = torch.cat(levels)  # [P, 4]
    if spec.clip:
        priors = priors.clamp(0.0, 1.0)
    return priors.to(dtype)
