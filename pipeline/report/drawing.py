"""Detections drawn onto an image with PIL ``ImageDraw``: a box per detection coloured by class, and a
label "name 0.87" on a filled tag above it.

Fast enough for every image of a prediction run (no matplotlib figure per image); the result keeps the
input's size, so it can be saved next to the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Class colours (RGB): matplotlib's "tab10" followed by the light half of "tab20", so consecutive labels
# get clearly different hues; label k uses PALETTE[(k - 1) % len(PALETTE)].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)

# Line width and font size scale with the image: 1/300 and 1/32 of its shorter side, within these bounds.
MIN_LINE_WIDTH, MAX_LINE_WIDTH = 1, 8
MIN_FONT_SIZE, MAX_FONT_SIZE = 11, 48


def class_colour(label: int) -> tuple[int, int, int]:
    """RGB colour of detector label ``label`` (1..C-1); the same label always gets the same colour."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def label_text(label: int, score: float, class_names: Sequence[str]) -> str:
    """``"name 0.87"``; ``class_names[i]`` names label ``i + 1`` (labels without a name print as ``class k``)."""
    label = int(label)
    name = class_names[label - 1] if 1 <= label <= len(class_names) else f"class {label}"
    return f"{name} {float(score):.2f}"


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """PIL's bundled font at ``size`` pixels (a bitmap font where PIL was built without FreeType)."""
    return ImageFont.load_default(size=size)


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light tags, white on dark ones (ITU-R BT.601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def draw_detections(
    image: Image.Image,
    boxes: np.ndarray | Sequence[Sequence[float]],
    scores: np.ndarray | Sequence[float],
    labels: np.ndarray | Sequence[int],
    class_names: Sequence[str],
) -> Image.Image:
    """A copy of ``image`` with the detections drawn on it; ``image`` itself is not modified.

    Args:
        image: a PIL image of any size; other modes than RGB are converted to RGB first.
        boxes: ``[K, 4]`` xyxy in pixels of ``image``.
        scores: ``[K]`` scores in [0, 1], printed with two decimals.
        labels: ``[K]`` detector labels 1..C-1.
        class_names: ``class_names[i]`` is the name of label ``i + 1`` (as in the model file).

    Returns:
        A new RGB image of the same size. Boxes are drawn in the order given, so pass them by
        increasing score for the best detection to end up on top. The label tag sits above its box, or
        just inside the box's top edge when the box touches the top of the image.

    Raises:
        ValueError: ``boxes`` is not ``[K, 4]`` or ``scores``/``labels`` are not ``[K]``.
    """
    boxes_px = np.asarray(boxes, dtype=np.float64)
    if boxes_px.size == 0:
        boxes_px = boxes_px.reshape(0, 4)
    scores_np = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels_np = np.asarray(labels, dtype=np.int64).reshape(-1)
    k = boxes_px.shape[0]
    if boxes_px.shape != (k, 4) or scores_np.shape != (k,) or labels_np.shape != (k,):
        raise ValueError(
            f"draw_detections: expected boxes [K, 4], scores [K] and labels [K]; got boxes "
            f"{list(boxes_px.shape)}, scores {list(scores_np.shape)}, labels {list(labels_np.shape)}"
        )
    out = image.copy() if image.mode == "RGB" else image.convert("RGB")
    if k == 0:
        return out
    width, height = out.size
    side = min(width, height)
    line = int(np.clip(round(side / 300), MIN_LINE_WIDTH, MAX_LINE_WIDTH))
    font = _font(int(np.clip(round(side / 32), MIN_FONT_SIZE, MAX_FONT_SIZE)))
    draw = ImageDraw.Draw(out)
    for (x1, y1, x2, y2), score, label in zip(boxes_px.tolist(), scores_np.tolist(), labels_np.tolist(), strict=True):
        colour = class_colour(label)
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=line)
        text = label_text(label, score, class_names)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 2 * line, bottom - top + 2 * line
        tag_y = y1 - tag_h if y1 - tag_h >= 0 else y1  # above the box, else inside its top edge
        tag_x = min(max(x1, 0), max(width - tag_w, 0))  # keep the tag on the image
        draw.rectangle((tag_x, tag_y, tag_x + tag_w, tag_y + tag_h), fill=colour)
        draw.text((tag_x + line - left, tag_y + line - top), text, fill=_text_colour(colour), font=font)
    return out
