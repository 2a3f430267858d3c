"""COCO source: contiguous labels from sparse ids, crowd boxes as difficult, every bad entry counted."""

from __future__ import annotations

import json

import pytest

from pipeline.sources.records import PrepareError
from pipeline.stages.prepare import prepare
from tests.pipeline.fixtures import make_coco, make_params


def _coco(root, **extra):
    return make_params(**{"data.source": "coco", "data.coco.train_json": str(root / "instances.json"),
                          "data.coco.train_images": str(root / "images"), **extra})


def test_labels_crowd_and_bad_entries(tmp_path):
    make_coco(tmp_path)
    result = prepare(_coco(tmp_path), tmp_path / "out", progress=False)
    # Category ids 3 ("a") and 7 ("b") in ascending id order -> labels 1 and 2.
    assert result.classes == ["a", "b"]
    records = {r.id: r for r in result.records["train"]}
    assert sorted(records) == ["train/1", "train/2", "train/3"]  # "<split>/<COCO image id>"
    # bbox [x, y, w, h] = [5, 5, 20, 15] -> xyxy [5, 5, 25, 20]; the crowd box is kept as difficult.
    assert records["train/1"].boxes == [[5, 5, 25, 20], [0, 0, 10, 10]]
    assert records["train/1"].labels == [1, 2]
    assert records["train/1"].difficult == [False, True]
    # Image 2: one good box; unknown category, 3-number bbox and negative width are dropped.
    assert records["train/2"].boxes == [[10, 10, 15, 15]] and records["train/2"].labels == [2]
    # Image 3 claims width 60 but is 50 wide: corrected; its box [40, 30, 70, 60] is clipped to the image.
    assert (records["train/3"].width, records["train/3"].boxes) == (50, [[40, 30, 50, 40]])

    report = result.report.to_dict()
    assert report["images"] == {
        "in": 6, "kept": 3, "rejected": 3,
        "rejected_by_reason": {"annotation_malformed": 1, "duplicate_id": 1, "unsafe_path": 1},
        "corrected_by_reason": {"size_mismatch": 1},
    }
    assert report["boxes"]["rejected_by_reason"] == {
        "box_inverted": 1, "box_malformed": 1, "box_orphan": 1, "image_rejected": 1, "unknown_class": 1,
    }
    assert (report["boxes"]["in"], report["boxes"]["kept"]) == (9, 4)
    assert report["boxes"]["corrected_by_reason"] == {"box_clipped": 1}


def test_val_json_maps_categories_by_name(tmp_path):
    make_coco(tmp_path / "train")
    data = make_coco(tmp_path / "val")
    # The validation file numbers the same names differently: "b" is 1 there, "a" is 2.
    text = (tmp_path / "val" / "instances.json").read_text()
    data["categories"] = [{"id": 1, "name": "b"}, {"id": 2, "name": "a"}]
    for ann in data["annotations"]:
        ann["category_id"] = {3: 2, 7: 1}.get(ann["category_id"], 99)
    (tmp_path / "val" / "instances.json").write_text(json.dumps(data))
    assert text != (tmp_path / "val" / "instances.json").read_text()
    params = _coco(tmp_path / "train", **{"data.coco.val_json": str(tmp_path / "val" / "instances.json"),
                                          "data.coco.val_images": str(tmp_path / "val" / "images")})
    result = prepare(params, tmp_path / "out", progress=False)
    train = {r.id: r.labels for r in result.records["train"]}
    val = {r.id: r.labels for r in result.records["val"]}
    assert train["train/1"] == val["val/1"] == [1, 2]


def test_not_a_coco_file_stops_the_stage(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "instances.json").write_text('{"images": [}')
    with pytest.raises(PrepareError, match="not valid JSON"):
        prepare(_coco(tmp_path), tmp_path / "out", progress=False)
    (tmp_path / "instances.json").write_text('{"images": []}')
    with pytest.raises(PrepareError, match="'annotations'"):
        prepare(_coco(tmp_path), tmp_path / "out", progress=False)
