"""The synthetic source: deterministic, tight boxes, the documented scale/aspect/overlap ranges, fast."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.config import SyntheticConfig
from pipeline.sources import synthetic
from pipeline.sources.synthetic import CLASSES, DIFFICULT_BELOW, generate_image, write_synthetic
from pipeline.stages.prepare import prepare
from tests.pipeline.fixtures import make_params


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.jpg"))}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    cfg = SyntheticConfig(num_train=4, num_val=2, image_size=64, seed=5)
    first = write_synthetic(tmp_path / "a", cfg)
    second = write_synthetic(tmp_path / "b", cfg)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert [c.objects for c in first] == [c.objects for c in second]
    write_synthetic(tmp_path / "c", SyntheticConfig(num_train=4, num_val=2, image_size=64, seed=6))
    assert _files(tmp_path / "a").values() != _files(tmp_path / "c").values()
    assert all(a != c for a, c in zip(_files(tmp_path / "a").values(), _files(tmp_path / "c").values(), strict=True))


def test_an_image_does_not_depend_on_the_count(tmp_path):
    write_synthetic(tmp_path / "small", SyntheticConfig(num_train=2, num_val=1, image_size=48))
    write_synthetic(tmp_path / "large", SyntheticConfig(num_train=5, num_val=3, image_size=48))
    small, large = _files(tmp_path / "small"), _files(tmp_path / "large")
    assert small == {name: large[name] for name in small}


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("box", [(3, 4, 30, 12), (10, 2, 17, 40), (0, 0, 48, 48), (20, 20, 24, 23)])
def test_each_shape_fills_its_box_exactly(name, box):
    canvas = Image.new("RGB", (48, 48))
    synthetic._draw_shape(np.random.default_rng(0), ImageDraw.Draw(canvas), name, box, (255, 255, 255))
    ys, xs = np.nonzero(np.asarray(canvas)[..., 0])
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == box


def test_scales_aspects_overlaps_and_difficult_flags():
    size, sides, aspects, labels = 160, [], [], []
    for i in range(150):
        sample = generate_image(np.random.default_rng([0, 0, i]), size, 6)
        boxes = sample.boxes_px
        assert len(boxes) >= 1 and sample.image.size == (size, size)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= size).all()
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        assert np.array_equal(sample.difficult, np.sqrt(w * h) / size < DIFFICULT_BELOW)
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                assert synthetic._acceptable_overlap(tuple(boxes[a]), tuple(boxes[b]))
        sides += list(np.maximum(w, h) / size)
        aspects += list(w / h)
        labels += list(sample.labels)
    sides, aspects = np.array(sides), np.array(aspects)
    assert sides.min() < 0.05 and sides.max() > 0.7  # ~2% .. ~80% of the side
    assert 0.03 < (sides < 0.1).mean() < 0.3  # only a few small objects
    assert aspects.min() < 0.5 and aspects.max() > 2.0
    assert set(labels) == set(range(1, len(CLASSES) + 1))
    counts = np.bincount(labels)[1:]
    assert counts.min() > 0.6 * counts.max()  # classes roughly balanced


def test_objects_stand_out_from_their_background():
    """Inside each filled object (not covered by a later, smaller one) the pixels differ from the image's
    median colour: the contrast rule keeps objects visible."""
    checked = 0
    for i in range(40):
        sample = generate_image(np.random.default_rng([1, 0, i]), 96, 3)
        pixels = np.asarray(sample.image, dtype=np.float64)
        luminance = pixels @ np.array([0.299, 0.587, 0.114])
        x1, y1, x2, y2 = (int(v) for v in sample.boxes_px[-1])  # drawn last: never covered
        if CLASSES[sample.labels[-1] - 1] in ("ellipse", "rectangle") and min(x2 - x1, y2 - y1) >= 8:
            cy, cx = (y1 + y2) // 2, (x1 + x2) // 2
            border = np.concatenate([luminance[max(y1 - 2, 0), x1:x2], luminance[min(y2 + 1, 95), x1:x2]])
            assert abs(luminance[cy - 1 : cy + 2, cx - 1 : cx + 2].mean() - np.median(border)) > 25
            checked += 1
    assert checked >= 5


def test_default_sized_generation_is_fast(tmp_path):
    """100 images at the default 160 px through the whole prepare path; the 1,800 of the default run must
    take well under a minute, i.e. this must take well under 100 / 1800 * 60 = 3.3 s."""
    params = make_params(**{"data.synthetic.num_train": 90, "data.synthetic.num_val": 10})
    start = time.perf_counter()
    result = prepare(params, tmp_path, progress=False)
    elapsed = time.perf_counter() - start
    assert result.report.images_kept == 100 and result.classes == list(CLASSES)
    assert elapsed < 3.0, f"{elapsed:.2f} s for 100 images"
