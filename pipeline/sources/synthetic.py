"""The embedded default dataset: coloured shapes on cluttered backgrounds, generated deterministically.

The class is the *shape*; colour is random, so colour alone never tells the class:

    ellipse (filled)  ring (outlined ellipse)  rectangle (filled)  frame (outlined rectangle)  triangle (filled)

Each image (``size`` x ``size``) has 1..``max_objects`` objects with sides from 2% to 80% of the image and
aspect ratios from 1:2.5 to 2.5:1; most objects are 10-80% of the side, ``SMALL_FRACTION`` of them 2-10%.
Objects may overlap partly (IoU <= 0.3, and at most half of the smaller one over the larger), larger ones are
drawn first. Objects whose geometric-mean side is under ``DIFFICULT_BELOW`` of the image are marked
*difficult* (present, but ignored by matching and mAP, as VOC does for objects too small to judge).
Backgrounds have a low-frequency colour field plus noise or stripes, and thin line clutter (straight lines,
zigzags, plus signs) that belongs to no class. Object colours keep a minimum luminance contrast with the
background under them.

Determinism: image ``i`` of split ``s`` depends only on ``(seed, s, i, size, max_objects)``, drawn from
``numpy.random.default_rng([seed, split_code, i])``, so changing ``num_train`` never changes existing images.
"""

from __future__ import annotations

import colorsys
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import SyntheticConfig
from pipeline.sources.records import Candidate, RawObject

logger = logging.getLogger(__name__)

CLASSES = ("ellipse", "ring", "rectangle", "frame", "triangle")
SMALL_FRACTION = 0.15  # share of objects drawn 2-10% of the image side
SMALL_SIDE = (0.02, 0.10)  # side / image side, log-uniform
LARGE_SIDE = (0.10, 0.80)
MAX_ASPECT = 2.5  # width / height in [1 / MAX_ASPECT, MAX_ASPECT], log-uniform
DIFFICULT_BELOW = 0.04  # geometric-mean side / image side under which an object is marked difficult
MAX_IOU = 0.3  # placement: overlap allowed between objects
MAX_COVER = 0.5  # placement: intersection / smaller area allowed
MIN_CONTRAST = 60.0  # |object luminance - background luminance| on 0..255
JPEG_QUALITY = 90
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class SyntheticImage(NamedTuple):
    image: Image.Image  # RGB, size x size
    boxes_px: np.ndarray  # [G, 4] float64 xyxy, continuous pixel coordinates
    labels: np.ndarray  # [G] int64, 1-based index into CLASSES
    difficult: np.ndarray  # [G] bool


def generate_image(rng: np.random.Generator, size: int, max_objects: int) -> SyntheticImage:
    """One image and its annotation, drawn from ``rng``."""
    canvas = _background(rng, size)  # [S, S, 3] float32
    image = Image.fromarray(canvas.clip(0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, size)
    boxes = _place_boxes(rng, size, int(rng.integers(1, max_objects + 1)))  # [G, 4] ints, largest first
    labels = rng.integers(1, len(CLASSES) + 1, size=len(boxes))
    luminance = canvas @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # [S, S]
    for box, label in zip(boxes, labels, strict=True):
        x1, y1, x2, y2 = (int(v) for v in box)
        colour = _contrasting_colour(rng, float(luminance[y1:y2, x1:x2].mean()))
        _draw_shape(rng, draw, CLASSES[label - 1], (x1, y1, x2, y2), colour)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, rng.uniform(2.0, 8.0), (size, size, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="RGB")
    sides = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) / size  # [G]
    return SyntheticImage(image, boxes.astype(np.float64), labels.astype(np.int64), sides < DIFFICULT_BELOW)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation base colour + a smooth colour field + noise or stripes -> [S, S, 3] float32."""
    hue, sat, val = rng.uniform(), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.85)
    base = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255
    cells = int(rng.integers(2, 6))
    coarse = rng.uniform(-45, 45, (cells, cells, 1)) + rng.uniform(-20, 20, (cells, cells, 3))  # brightness + tint
    field = np.stack(
        [
            np.asarray(
                Image.fromarray(coarse[..., c].astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)
            )
            for c in range(3)
        ],
        axis=-1,
    )  # [S, S, 3]
    canvas = base + field
    if rng.uniform() < 0.5:
        canvas += rng.normal(0.0, rng.uniform(4.0, 16.0), (size, size, 1)).astype(np.float32)
    else:
        angle, period = rng.uniform(0, np.pi), rng.uniform(5.0, 30.0)
        y, x = np.mgrid[0:size, 0:size].astype(np.float32)
        phase = (x * np.cos(angle) + y * np.sin(angle)) * (2 * np.pi / period)
        canvas += (rng.uniform(6.0, 25.0) * np.sin(phase))[..., None]
    return canvas.astype(np.float32)


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """Thin strokes that belong to no class: straight lines, zigzags and plus signs."""
    for _ in range(int(rng.integers(0, 6))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        width = int(rng.integers(1, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.line([tuple(rng.uniform(0, size, 2)), tuple(rng.uniform(0, size, 2))], fill=colour, width=width)
        elif kind == 1:
            start = rng.uniform(0, size, 2)
            points = [tuple(start + rng.uniform(-0.15, 0.15, 2) * size * k) for k in range(int(rng.integers(3, 7)))]
            draw.line(points, fill=colour, width=width)
        else:
            cx, cy = rng.uniform(0, size, 2)
            arm = rng.uniform(0.02, 0.08) * size
            draw.line([(cx - arm, cy), (cx + arm, cy)], fill=colour, width=width)
            draw.line([(cx, cy - arm), (cx, cy + arm)], fill=colour, width=width)


def _place_boxes(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """Up to ``count`` integer xyxy boxes inside the image, overlapping at most partly; largest first."""
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(count):
        for _attempt in range(20):
            low, high = SMALL_SIDE if rng.uniform() < SMALL_FRACTION else LARGE_SIDE
            side = np.exp(rng.uniform(np.log(low), np.log(high))) * size
            aspect = np.exp(rng.uniform(-np.log(MAX_ASPECT), np.log(MAX_ASPECT)))
            w = int(np.clip(round(side * np.sqrt(aspect)), 3, size - 1))
            h = int(np.clip(round(side / np.sqrt(aspect)), 3, size - 1))
            x1, y1 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            box = (x1, y1, x1 + w, y1 + h)
            if all(_acceptable_overlap(box, other) for other in boxes):
                boxes.append(box)
                break
    boxes.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    return np.array(boxes, dtype=np.int64).reshape(-1, 4)  # [G, 4]


def _acceptable_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a, area_b = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter <= MAX_IOU * (area_a + area_b - inter) and inter <= MAX_COVER * min(area_a, area_b)


def _contrasting_colour(rng: np.random.Generator, background_luminance: float) -> tuple[int, int, int]:
    """A saturated colour whose luminance differs from the background's by at least ``MIN_CONTRAST``."""
    for _ in range(20):
        rgb = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.45, 1.0), rng.uniform(0.15, 1.0))) * 255
        if abs(float(rgb @ np.array([0.299, 0.587, 0.114])) - background_luminance) >= MIN_CONTRAST:
            return tuple(int(v) for v in rgb)
    return (255, 255, 255) if background_luminance < 128 else (0, 0, 0)


def _draw_shape(
    rng: np.random.Generator, draw: ImageDraw.ImageDraw, name: str, box: tuple[int, int, int, int], colour
) -> None:
    """Draw ``name`` filling the integer box exactly (PIL's shape coordinates are inclusive: x2 - 1)."""
    x1, y1, x2, y2 = box
    inclusive = (x1, y1, x2 - 1, y2 - 1)
    stroke = max(1, round(min(x2 - x1, y2 - y1) * rng.uniform(0.08, 0.16)))
    if name == "ellipse":
        draw.ellipse(inclusive, fill=colour)
    elif name == "ring":
        draw.ellipse(inclusive, outline=colour, width=stroke)
    elif name == "rectangle":
        draw.rectangle(inclusive, fill=colour)
    elif name == "frame":
        draw.rectangle(inclusive, outline=colour, width=stroke)
    elif name == "triangle":
        xm, ym, xe, ye = (x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2, x2 - 1, y2 - 1
        points = {
            0: [(x1, ye), (xe, ye), (xm, y1)],  # apex up
            1: [(x1, y1), (xe, y1), (xm, ye)],  # apex down
            2: [(x1, y1), (x1, ye), (xe, ym)],  # apex right
            3: [(xe, y1), (xe, ye), (x1, ym)],  # apex left
        }[int(rng.integers(4))]
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown synthetic class {name!r}; expected one of {CLASSES}")


def write_synthetic(out_dir: Path, cfg: SyntheticConfig) -> list[Candidate]:
    """Generate the splits (test only when ``num_test`` > 0) as JPEG files under ``out_dir/images/{split}/``;
    returns their candidates.

    ``out_dir/images`` must be new or empty: ``prepare`` passes a fresh build folder that replaces its
    output as a whole, so no file from an earlier, larger run survives and no other file is overwritten.

    Raises:
        ValueError: ``out_dir/images`` already holds something (named).
    """
    images_dir = out_dir / "images"
    if images_dir.exists() and (not images_dir.is_dir() or any(images_dir.iterdir())):
        raise ValueError(
            f"synthetic: {images_dir} already exists and is not empty; expected a new folder "
            "(prepare builds its output in a fresh folder)"
        )
    candidates = []
    for split, count in (("train", cfg.num_train), ("val", cfg.num_val), ("test", cfg.num_test)):
        if not count:
            continue
        (images_dir / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([cfg.seed, _SPLIT_CODES[split], i])
            sample = generate_image(rng, cfg.image_size, cfg.max_objects)
            path = images_dir / split / f"{i:06d}.jpg"
            sample.image.save(path, format="JPEG", quality=JPEG_QUALITY)
            objects = tuple(
                RawObject(CLASSES[label - 1], tuple(float(v) for v in box), bool(difficult))
                for box, label, difficult in zip(sample.boxes_px, sample.labels, sample.difficult, strict=True)
            )
            candidates.append(
                Candidate(
                    f"synthetic/{split}/{i:06d}", split, path, str(path), (cfg.image_size, cfg.image_size), objects
                )
            )
    logger.info(
        "synthetic: wrote %d train, %d val and %d test images of %dx%d to %s",
        cfg.num_train,
        cfg.num_val,
        cfg.num_test,
        cfg.image_size,
        cfg.image_size,
        images_dir,
    )
    return candidates
