"""Detections drawn onto an image: box edges and the label tag in the class colour, the input left untouched,
grey and empty inputs, malformed arguments refused."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.report.drawing import class_colour, draw_detections, label_text

CLASSES = ["cat", "dog"]


def test_draw_detections_box_tag_and_copy():
    image = Image.new("RGB", (100, 80), (200, 200, 200))
    before = image.tobytes()
    out = draw_detections(image, [[10, 30, 60, 75]], [0.5], [2], CLASSES)
    assert image.tobytes() == before and out is not image and out.size == (100, 80)
    pixels = np.asarray(out)
    colour = class_colour(2)
    assert tuple(pixels[50, 10]) == colour  # left edge x = 10 (1 px line on a 80 px short side)
    assert tuple(pixels[50, 35]) == (200, 200, 200)  # inside the box, below the tag
    tag = pixels[:30, 10:60]  # the label sits above the box top y = 30
    assert (tag == colour).all(axis=-1).sum() > 50
    assert (pixels[:30, 70:] == 200).all()  # nothing right of the tag


def test_draw_detections_edge_cases():
    grey = Image.new("L", (40, 30), 128)
    out = draw_detections(grey, np.zeros((0, 4)), [], [], CLASSES)
    assert out.mode == "RGB" and out.size == (40, 30) and (np.asarray(out) == 128).all()
    top = draw_detections(Image.new("RGB", (60, 60)), [[5, 0, 50, 50]], [0.9], [1], CLASSES)
    assert (np.asarray(top)[1:12, 10:20] == class_colour(1)).all(axis=-1).any()  # tag inside the box at the top
    with pytest.raises(ValueError, match=r"expected boxes \[K, 4\]"):
        draw_detections(Image.new("RGB", (10, 10)), [[1, 2, 3]], [0.5], [1], CLASSES)
    with pytest.raises(ValueError, match="scores"):
        draw_detections(Image.new("RGB", (10, 10)), [[1, 2, 3, 4]], [0.5, 0.2], [1], CLASSES)
    assert label_text(2, 0.874, CLASSES) == "dog 0.87"
    assert label_text(5, 0.5, CLASSES) == "class 5 0.50"
    assert class_colour(1) != class_colour(2) and class_colour(3) == class_colour(23)
