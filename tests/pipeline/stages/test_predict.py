"""``python -m pipeline predict``: known detections from crafted weights, bad files, drawn copies, the CLI.

The crafted model (``crafted_model``): every loc head is zero, so each decoded box is its prior; every
conf head has zero weights, so the logits are the biases, the same for every image. All priors get
background 10 and 0 for both classes (class score e^0 / (e^10 + 2) ~ 4.5e-5, under the 0.01 threshold),
except three priors of the last level (1 x 1 map, centre (0.5, 0.5)), whose values are derived by hand here.

ssd_tiny priors (``SSD_TINY_PRIORS``: ``from_scales(160, first_scale=0.08, s_min=0.18, s_max=0.78)`` over
5 levels): the linear rule spreads 0.18..0.78 over levels 2..5 in steps of (0.78 - 0.18) / 3 = 0.2, so
scales are 0.08, 0.18, 0.38, 0.58, 0.78 and one extrapolated 0.98. Level 5 (1 x 1 map, aspect ratios (2,))
has 4 boxes, the last 4 of P = 20*20*4 + 10*10*6 + 5*5*6 + 3*3*4 + 1*1*4 = 2390 priors, all centred at
(0.5, 0.5), as (w, h):
  a0: (0.78, 0.78)                  -> xyxy (0.11, 0.11, 0.89, 0.89)
  a1: sqrt(0.78 * 0.98) = 0.874300  (square; stays background)
  a2: (0.78 * sqrt 2, 0.78 / sqrt 2) = (1.103087, 0.551543) -> clipped (0, 0.224229, 1, 0.775771)
  a3: (0.551543, 1.103087)          -> clipped (0.224229, 0, 0.775771, 1)
Logits (background, class 1 "cat", class 2 "dog"):
  a0: (0, 10, -20): cat score 1 / (1 + e^-10 + e^-30) = 0.9999546
  a3: (0, -20, 10): dog score 0.9999546
  a2: (0, -20, ln 0.25): dog score 0.25 / (1 + e^-20 + 0.25) = 0.2 (under the default --min-score 0.3)
  NMS (per class, IoU 0.45): the two dog boxes overlap in a 0.551543 x 0.551543 square; IoU =
  0.304200 / (2 * 0.551543 - 0.304200) = 0.3808 < 0.45, so both stay.
So every image of width W and height H gets cat (0.11 W, 0.11 H, 0.89 W, 0.89 H) and dog
(0.224229 W, 0, 0.775771 W, H) at 0.99995, and, with --min-score <= 0.2, dog (0, 0.224229 H, W, 0.775771 H)
at 0.2.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import cli
from pipeline.artifacts.model_file import load_model_file, save_model_file
from pipeline.config import load_params, params_to_dict
from pipeline.sources.images import load_rgb
from ssd_core.augment import eval_transform, normalize_images
from ssd_core.model import build_ssd
from ssd_core.postprocess import postprocess
from ssd_core.priors import generate_priors
from tests.pipeline.fixtures import eps_bytes, image_with_box, png_header_only, save_jpeg

REPO = Path(__file__).resolve().parents[3]
CLASSES = ["cat", "dog"]
HIGH = 1.0 / (1.0 + math.exp(-10) + math.exp(-30))  # a0 and a3 (module docstring)
LOW = 0.25 / (1.0 + math.exp(-20) + 0.25)  # a2
HALF_SIDE = 0.5 * 0.78 / math.sqrt(2)  # 0.275771: half the short side of a2/a3


def expected_detections(width: int, height: int, min_score: float) -> list[tuple[int, list[float], float]]:
    """(category, [x, y, w, h], score) of the crafted model for a W x H image, from the derivation above."""
    lo, hi = 0.5 - HALF_SIDE, 0.5 + HALF_SIDE
    boxes = [
        (1, [0.11, 0.11, 0.89, 0.89], HIGH),
        (2, [lo, 0.0, hi, 1.0], HIGH),
        (2, [0.0, lo, 1.0, hi], LOW),
    ]
    out = []
    for category, (x1, y1, x2, y2), score in boxes:
        if score >= min_score:
            out.append((category, [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height], score))
    return out


def _craft(model) -> None:
    """Set the heads as in the module docstring (in place)."""
    c = model.num_classes
    with torch.no_grad():
        for head in model.loc:
            head.weight.zero_()
            head.bias.zero_()
        for head in model.conf:
            head.weight.zero_()
            bias = head.bias.view(-1, c)  # [A, C]: channel a * C + c is class c of box a (SSD.forward)
            bias.zero_()
            bias[:, 0] = 10.0
        last = model.conf[-1].bias.view(-1, c)  # [4, 3]
        last[0] = torch.tensor([0.0, 10.0, -20.0])
        last[3] = torch.tensor([0.0, -20.0, 10.0])
        last[2] = torch.tensor([0.0, -20.0, math.log(0.25)])


@pytest.fixture(scope="module")
def crafted_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", num_classes=3)
    _craft(model)
    path = tmp_path_factory.mktemp("model") / "crafted.pt"
    save_model_file(path, model, classes=CLASSES, params=params_to_dict(load_params(None)))
    return path


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """Untrained ssd_tiny: its scores already vary with the image (top scores ~0.7-0.8, gaps ~1e-4)."""
    torch.manual_seed(1)
    model = build_ssd("ssd_tiny", num_classes=3)
    path = tmp_path_factory.mktemp("model") / "random.pt"
    save_model_file(path, model, classes=CLASSES, params=params_to_dict(load_params(None)))
    return path


def _noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    """Good images of different sizes and kinds, bad files, a non-image file and a subfolder."""
    photos = tmp_path / "photos"
    photos.mkdir()
    image_with_box((64, 48), (20, 10, 40, 30)).save(photos / "a.png")
    save_jpeg(photos / "b.jpg", image_with_box((40, 72), (5, 5, 20, 30), seed=1))
    save_jpeg(photos / "g.jpeg", _noise(50, 36, 2).convert("L").convert("RGB"))
    save_jpeg(photos / "rot.jpg", image_with_box((60, 30), (0, 0, 20, 10), seed=3), orientation=6)  # upright 30x60
    whole = photos / "whole.jpg"
    save_jpeg(whole, _noise(64, 64, 4))
    (photos / "corrupt.jpg").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    whole.unlink()
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "text.png").write_text("this is not a PNG\n", encoding="utf-8")
    (photos / "bomb.png").write_bytes(png_header_only(10_000, 10_000))  # 1e8 pixels > 89,478,485
    (photos / "notes.txt").write_text("not an image extension: never read\n", encoding="utf-8")
    (photos / "sub").mkdir()
    image_with_box((32, 32)).save(photos / "sub" / "deep.png")  # subfolders are not read
    (tmp_path / "other").mkdir()
    image_with_box((20, 24), (2, 2, 10, 10), seed=5).save(tmp_path / "other" / "a.png")  # same name as photos/a.png
    return tmp_path


def _run_cli(*argv: str) -> int:
    return cli.main(["predict", *argv])


def _assert_detections(annotations: list[dict], width: int, height: int, min_score: float) -> None:
    want = sorted(expected_detections(width, height, min_score), key=lambda d: (d[0], -d[2]))
    got = sorted(annotations, key=lambda a: (a["category_id"], -a["score"]))
    assert [a["category_id"] for a in got] == [d[0] for d in want]
    for a, (_, bbox, score) in zip(got, want, strict=True):
        assert a["bbox"] == pytest.approx(bbox, abs=0.011)  # rounded to 1/100 px, float32 maths
        assert a["score"] == pytest.approx(score, abs=2e-5)
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], abs=0.01)
    scores = [a["score"] for a in annotations]
    assert scores == sorted(scores, reverse=True), "per image, by decreasing score"


# ------------------------------------------------------------------------------------ known detections
def test_hand_derived_priors_match_generate_priors(crafted_model):
    model = load_model_file(crafted_model).model
    priors = generate_priors(model.prior_spec).numpy()
    assert priors.shape == (2390, 4)
    a1 = math.sqrt(0.78 * 0.98)
    long, short = 0.78 * math.sqrt(2), 0.78 / math.sqrt(2)
    want = [[0.5, 0.5, 0.78, 0.78], [0.5, 0.5, a1, a1], [0.5, 0.5, long, short], [0.5, 0.5, short, long]]
    np.testing.assert_allclose(priors[-4:], want, atol=1e-6)


def test_folder_with_good_and_bad_images(crafted_model, photo_dir, monkeypatch, caplog):
    monkeypatch.chdir(photo_dir)
    caplog.set_level(logging.INFO, logger="pipeline.stages.predict")
    rc = _run_cli("--model", str(crafted_model), "--batch-size", "2", "photos", "other/a.png")
    assert rc == 0
    doc = json.loads((photo_dir / "predictions" / "detections.json").read_text(encoding="utf-8"))

    # Folders: sorted by name, top level only, image extensions only; then the explicit file.
    ok = [
        ("photos/a.png", 64, 48),
        ("photos/b.jpg", 40, 72),
        ("photos/g.jpeg", 50, 36),
        ("photos/rot.jpg", 30, 60),
        ("other/a.png", 20, 24),
    ]
    assert [(i["file_name"], i["width"], i["height"]) for i in doc["images"]] == ok
    assert [i["id"] for i in doc["images"]] == [1, 2, 3, 4, 5]
    assert doc["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    reasons = {f["file"]: f["reason"].split(":")[0] for f in doc["failed"]}
    assert reasons == {
        "photos/bomb.png": "image_too_large",
        "photos/corrupt.jpg": "image_truncated",
        "photos/empty.jpg": "image_unreadable",
        "photos/text.png": "image_unreadable",
    }

    # Known boxes, in the pixels of each upright original (rot.jpg is stored 60x30, displayed 30x60).
    for image in doc["images"]:
        mine = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        _assert_detections(mine, image["width"], image["height"], min_score=0.3)
    assert [a["id"] for a in doc["annotations"]] == list(range(1, 11))

    # Every bad file is named in a warning, and the summary counts.
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in reasons:
        assert any(name in message for message in warned), name
    assert "predict: 5 images, 10 detections ≥ 0.30, 4 failed (see predictions/detections.json)" in caplog.text

    # The plain results list loads into pycocotools against the document's images and categories.
    from pycocotools.coco import COCO

    results = json.loads((photo_dir / "predictions" / "results.json").read_text(encoding="utf-8"))
    assert results == [{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in doc["annotations"]]
    gt = COCO()
    gt.dataset = {"images": doc["images"], "categories": doc["categories"], "annotations": []}
    gt.createIndex()
    assert len(gt.loadRes(str(photo_dir / "predictions" / "results.json")).anns) == 10


def test_drawn_copies(crafted_model, photo_dir, monkeypatch):
    monkeypatch.chdir(photo_dir)
    assert _run_cli("--model", str(crafted_model), "photos", "other/a.png") == 0
    out = photo_dir / "predictions"
    doc = json.loads((out / "detections.json").read_text(encoding="utf-8"))
    drawn = {i["file_name"]: i["drawn"] for i in doc["images"]}
    # photos/a.png keeps its name, other/a.png gets -2; PNG stays PNG, the rest become JPEG.
    assert drawn == {
        "photos/a.png": "images/a.png",
        "photos/b.jpg": "images/b.jpg",
        "photos/g.jpeg": "images/g.jpg",
        "photos/rot.jpg": "images/rot.jpg",
        "other/a.png": "images/a-2.png",
    }
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a-2.png", "a.png", "b.jpg", "g.jpg", "rot.jpg"]
    for image in doc["images"]:
        with Image.open(out / image["drawn"]) as copy:
            assert copy.size == (image["width"], image["height"])
            assert copy.format == ("PNG" if image["drawn"].endswith(".png") else "JPEG")

    original = np.asarray(Image.open(photo_dir / "photos" / "a.png").convert("RGB")).astype(int)  # [48, 64, 3]
    copy = np.asarray(Image.open(out / "images" / "a.png").convert("RGB")).astype(int)
    # The cat box's left edge is at x = 0.11 * 64 = 7.04 (rows 5.28..42.72); the centre (32, 24) lies
    # inside both boxes, below both label tags (each at most ~16 px tall from the box top at y <= 5.28).
    assert np.abs(copy[20:30, 6:9] - original[20:30, 6:9]).sum() > 0
    np.testing.assert_array_equal(copy[24, 30:34], original[24, 30:34])
    assert not np.array_equal(copy, original)
    rotated = np.asarray(Image.open(out / "images" / "rot.jpg"))
    assert rotated.shape == (60, 30, 3)


def test_min_score_and_no_draw(crafted_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image_with_box((80, 50)).save(tmp_path / "one.png")
    assert _run_cli("--model", str(crafted_model), "--min-score", "0.1", "--no-draw", "--out", "o", "one.png") == 0
    doc = json.loads((tmp_path / "o" / "detections.json").read_text(encoding="utf-8"))
    _assert_detections(doc["annotations"], 80, 50, min_score=0.1)
    assert len(doc["annotations"]) == 3  # the 0.2 dog box is in
    assert "drawn" not in doc["images"][0] and not (tmp_path / "o" / "images").exists()


def test_matches_forward_and_postprocess_per_image(random_model, tmp_path, monkeypatch):
    """Batches of 2 over 5 images of different sizes give what one image at a time gives."""
    monkeypatch.chdir(tmp_path)
    sizes = [(64, 48), (33, 90), (160, 160), (17, 21), (120, 40)]
    (tmp_path / "in").mkdir()
    for k, (w, h) in enumerate(sizes):
        _noise(w, h, 10 + k).save(tmp_path / "in" / f"{k}.png")
    argv = ["--model", str(random_model), "--batch-size", "2", "--min-score", "0.05", "--no-draw", "in"]
    assert _run_cli(*argv, "eval.max_detections=15") == 0
    doc = json.loads((tmp_path / "predictions" / "detections.json").read_text(encoding="utf-8"))
    assert [i["file_name"] for i in doc["images"]] == [f"in/{k}.png" for k in range(5)]

    model = load_model_file(random_model).model
    priors = model.priors()
    total = 0
    for image in doc["images"]:
        rgb = load_rgb(image["file_name"], max_pixels=10**8)
        pixels = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)  # [3, H, W]
        with torch.no_grad():
            output = model(normalize_images(eval_transform(pixels, model.image_size)[None]))
        det = postprocess(output.loc, output.cls_logits, priors, [rgb.size], max_detections=15)[0]
        keep = det.scores >= 0.05
        want = zip(det.labels[keep].tolist(), det.scores[keep].tolist(), det.boxes[keep].tolist(), strict=True)
        got = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        unmatched = list(got)
        for label, score, (x1, y1, x2, y2) in want:  # match one to one, whatever the order of near-equal scores
            match = next(
                a
                for a in unmatched
                if a["category_id"] == label
                and abs(a["score"] - score) < 1e-4
                and a["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.02)
            )
            unmatched.remove(match)
        assert not unmatched and len(got) == int(keep.sum()) > 0
        total += len(got)
    assert total == len(doc["annotations"])


# ------------------------------------------------------------------------------------------- errors
def test_usage_errors_exit_2(crafted_model, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    image_with_box((20, 20)).save(tmp_path / "x.png")
    assert _run_cli("--model", str(crafted_model)) == 2
    assert "at least one image" in caplog.text
    assert _run_cli("--model", str(crafted_model), "x.png", "nope.jpg") == 2
    assert "nope.jpg: no such file or folder" in caplog.text
    assert _run_cli("--model", "missing.pt", "x.png") == 2
    assert "model file missing.pt not found" in caplog.text
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    assert _run_cli("--model", "junk.pt", "x.png") == 2
    assert "junk.pt: not a readable model file" in caplog.text
    assert _run_cli("--model", str(crafted_model), "--device", "tpu", "x.png") == 2
    assert "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'" in caplog.text
    assert _run_cli("--model", str(crafted_model), "--batch-size", "0", "x.png") == 2
    assert not (tmp_path / "predictions").exists()


def test_all_failed_exits_1(crafted_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.png").write_text("no", encoding="utf-8")
    (tmp_path / "bad2.jpg").write_bytes(b"")
    assert _run_cli("--model", str(crafted_model), "bad.png", "bad2.jpg") == 1
    doc = json.loads((tmp_path / "predictions" / "detections.json").read_text(encoding="utf-8"))
    assert doc["images"] == [] and doc["annotations"] == [] and len(doc["failed"]) == 2


def test_formats_outside_the_allowed_list_are_listed_as_failed(crafted_model, tmp_path, monkeypatch):
    """EPS, TGA and SGI named on the command line (a folder would skip their extensions) are refused unread;
    an EPS named .jpg is refused by its signature; a BMP (allowed) is read."""
    monkeypatch.chdir(tmp_path)
    picture = image_with_box((32, 24), (4, 4, 16, 16))
    for name, fmt in (("x.eps", "EPS"), ("x.tga", "TGA"), ("x.sgi", "SGI"), ("ok.bmp", "BMP")):
        picture.save(tmp_path / name, format=fmt)
    (tmp_path / "eps.jpg").write_bytes(eps_bytes(32, 24))
    assert _run_cli("--model", str(crafted_model), "x.eps", "x.tga", "x.sgi", "eps.jpg", "ok.bmp") == 0
    doc = json.loads((tmp_path / "predictions" / "detections.json").read_text(encoding="utf-8"))
    assert [i["file_name"] for i in doc["images"]] == ["ok.bmp"]
    reasons = {f["file"]: f["reason"].split(":")[0] for f in doc["failed"]}
    assert reasons == dict.fromkeys(["x.eps", "x.tga", "x.sgi", "eps.jpg"], "image_format_not_allowed")


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_onto_or_into_an_input_folder_is_refused_before_any_work(crafted_model, photo_dir, monkeypatch, caplog):
    """The reported case: ``predict data/images --out data`` drew over the originals in data/images."""
    monkeypatch.chdir(photo_dir)
    before = _snapshot(photo_dir)
    model = ["--model", str(crafted_model)]
    assert _run_cli(*model, "photos", "--out", "photos") == 2  # out == input
    assert f"--out photos ({photo_dir / 'photos'}) is the input folder photos" in caplog.text
    assert _run_cli(*model, "photos", "--out", "photos/predictions") == 2  # out inside an input folder
    assert "lies inside the input folder photos" in caplog.text
    (photo_dir / "data").mkdir()
    (photo_dir / "photos").rename(photo_dir / "data" / "images")
    assert _run_cli(*model, "data/images", "--out", "data") == 2  # the input is out/images
    assert f"the input data/images ({photo_dir / 'data' / 'images'}) lies where --out data" in caplog.text
    assert _run_cli(*model, "data/images/a.png", "--out", "data") == 2  # an input file among the outputs
    (photo_dir / "data" / "images").rename(photo_dir / "photos")
    (photo_dir / "data").rmdir()
    (photo_dir / "link").symlink_to(photo_dir / "photos", target_is_directory=True)
    assert _run_cli(*model, "photos", "--out", "link") == 2  # symbolic links are resolved
    assert f"--out link ({photo_dir / 'photos'}) is the input folder photos" in caplog.text
    (photo_dir / "link").unlink()
    assert _snapshot(photo_dir) == before  # every original byte-identical, nothing written anywhere


def test_a_folder_predict_did_not_make_gets_only_new_files(crafted_model, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    image_with_box((64, 48), (20, 10, 40, 30)).save(tmp_path / "in" / "a.png")
    mine = tmp_path / "mine"
    (mine / "images").mkdir(parents=True)
    (mine / "images" / "a.png").write_bytes(b"the user's own a.png")
    (mine / "detections.json").write_text("the user's own detections\n")
    before = _snapshot(mine)
    assert _run_cli("--model", str(crafted_model), "in", "--out", "mine") == 2
    assert "--out mine was not made by predict" in caplog.text
    assert "mine/detections.json, mine/images/a.png" in caplog.text
    assert _snapshot(mine) == before

    (mine / "detections.json").unlink()
    (mine / "images" / "a.png").rename(mine / "images" / "z.png")
    before = _snapshot(mine)
    assert _run_cli("--model", str(crafted_model), "in", "--out", "mine") == 0  # no name taken: new files only
    after = _snapshot(mine)
    assert {k: after[k] for k in before} == before
    assert sorted(after) == ["detections.json", "images/a.png", "images/z.png", "results.json"]  # no marker


def test_a_rerun_replaces_its_own_outputs(crafted_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    image_with_box((64, 48), (20, 10, 40, 30)).save(tmp_path / "in" / "a.png")
    for min_score in ("0.3", "0.1"):
        assert _run_cli("--model", str(crafted_model), "in", "--min-score", min_score) == 0
    out = tmp_path / "predictions"
    assert len(json.loads((out / "detections.json").read_text(encoding="utf-8"))["annotations"]) == 3
    assert sorted(_snapshot(out)) == [".ssd-pipeline", "detections.json", "images/a.png", "results.json"]


# ---------------------------------------------------------------------------------- subprocess / CLI
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


@pytest.mark.slow
def test_cli_subprocess(crafted_model, tmp_path):
    (tmp_path / "in").mkdir()
    for k, size in enumerate([(64, 48), (30, 40)]):
        image_with_box(size, seed=k).save(tmp_path / "in" / f"{k}.png")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "predict", "--model", str(crafted_model), "--out", "out", "in"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "predict: 2 images, 4 detections ≥ 0.30, 0 failed" in result.stderr
    doc = json.loads((tmp_path / "out" / "detections.json").read_text(encoding="utf-8"))
    assert len(doc["images"]) == 2 and len(doc["annotations"]) == 4
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["0.png", "1.png"]


@pytest.mark.slow
def test_no_ray_or_mlflow_imported(crafted_model, tmp_path):
    image_with_box((40, 40)).save(tmp_path / "x.png")
    code = (
        "import json, sys\n"
        "from pipeline import cli\n"
        f"rc = cli.main(['predict', '--model', {str(crafted_model)!r}, 'x.png'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow'))\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}
