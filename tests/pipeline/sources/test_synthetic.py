"""The synthetic source: deterministic, tight boxes, the documented scale/aspect/overlap ranges, fast."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline import cli
from pipeline.artifacts.output_folder import claim_output_folder, marker_stage
from pipeline.config import SyntheticConfig
from pipeline.sources import synthetic
from pipeline.sources.records import PrepareError, read_index
from pipeline.sources.synthetic import CLASSES, DIFFICULT_BELOW, generate_image, write_synthetic
from pipeline.stages import prepare as prepare_stage
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


# ------------------------------------------------------------------------------- the output folder
SMALL = [
    "data.synthetic.num_train=4",
    "data.synthetic.num_val=2",
    "data.synthetic.num_test=0",
    "data.synthetic.image_size=48",
]


def _prepare_cli(out, report, *overrides: str) -> int:
    return cli.main(["prepare", "--out", str(out), "--report", str(report), *SMALL, *overrides])


def test_prepare_refuses_a_folder_holding_the_users_files(tmp_path, caplog):
    """The reported case: ``prepare --out X`` deleted X/images (a user's file in X/images/sub/ with it)."""
    out = tmp_path / "X"
    (out / "images" / "sub").mkdir(parents=True)
    (out / "images" / "sub" / "mine.jpg").write_bytes(b"the user's photo")
    (out / "classes.json").write_text('["the user\'s"]\n')
    assert _prepare_cli(out, tmp_path / "report.json") == 1
    assert f"--out {out} is not empty (classes.json, images)" in caplog.text
    assert (out / "images" / "sub" / "mine.jpg").read_bytes() == b"the user's photo"
    assert (out / "classes.json").read_text() == '["the user\'s"]\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]  # no report, no build folder: refused first


def test_a_second_prepare_replaces_its_own_output_and_leaves_no_sibling(tmp_path):
    out, report = tmp_path / "prepared", tmp_path / "report.json"
    assert _prepare_cli(out, report, "data.synthetic.num_train=6") == 0
    assert marker_stage(out) == "prepare"
    assert len((out / "train.jsonl").read_text().splitlines()) == 6
    assert _prepare_cli(out, report) == 0  # 4 train images now: images 4 and 5 of the first run are gone
    images = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.jpg"))
    assert images == [f"images/train/{i:06d}.jpg" for i in range(4)] + [f"images/val/{i:06d}.jpg" for i in range(2)]
    records = read_index(out, "train")
    assert len(records) == 4 and all(r.image.is_file() and r.image.is_relative_to(out) for r in records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "report.json"]
    assert json.loads(report.read_text())["images"]["in"] == 6


def test_a_failed_prepare_leaves_the_previous_output(tmp_path, monkeypatch):
    out, report = tmp_path / "prepared", tmp_path / "report.json"
    assert _prepare_cli(out, report) == 0
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise PrepareError("prepare: disk full while writing the index")

    monkeypatch.setattr(prepare_stage, "write_index", fail)
    assert _prepare_cli(out, report, "data.synthetic.seed=9") == 1
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "report.json"]


def test_prepare_refuses_another_stages_folder_and_an_empty_one_is_fine(tmp_path, caplog):
    claim_output_folder(tmp_path / "shards", "shard")
    assert _prepare_cli(tmp_path / "shards", tmp_path / "report.json") == 1
    assert "holds the output of the shard stage" in caplog.text
    (tmp_path / "empty").mkdir()
    assert _prepare_cli(tmp_path / "empty", tmp_path / "report.json") == 0
    assert marker_stage(tmp_path / "empty") == "prepare"


def test_write_synthetic_never_writes_over_existing_images(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "images" / "train" / "000000.jpg").write_bytes(b"someone's")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        write_synthetic(tmp_path, SyntheticConfig(num_train=1, num_val=1, image_size=48))
    assert (tmp_path / "images" / "train" / "000000.jpg").read_bytes() == b"someone's"
