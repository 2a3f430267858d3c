"""COCO source: contiguous labels from sparse ids, crowd boxes as difficult, every bad entry counted."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.sources.records import PrepareError
from pipeline.stages.prepare import prepare
from tests.pipeline.fixtures import image_with_box, make_coco, make_params, save_jpeg


def _coco(root, **extra):
    return make_params(
        **{
            "data.source": "coco",
            "data.coco.train_json": str(root / "instances.json"),
            "data.coco.train_images": str(root / "images"),
            **extra,
        }
    )


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
        "in": 6,
        "kept": 3,
        "rejected": 3,
        "rejected_by_reason": {"annotation_malformed": 2, "unsafe_path": 1},
        "corrected_by_reason": {"size_mismatch": 1},
    }
    assert report["boxes"]["rejected_by_reason"] == {
        "box_inverted": 1,
        "box_malformed": 1,
        "box_orphan": 1,
        "image_rejected": 1,
        "unknown_class": 1,
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
    params = _coco(
        tmp_path / "train",
        **{
            "data.coco.val_json": str(tmp_path / "val" / "instances.json"),
            "data.coco.val_images": str(tmp_path / "val" / "images"),
        },
    )
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


def _write(root, data) -> None:
    (root / "images").mkdir(exist_ok=True)
    (root / "instances.json").write_text(json.dumps(data), encoding="utf-8")


def _ann(ann_id, **fields):
    return {"id": ann_id, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 15], "iscrowd": 0, **fields}


def test_hostile_entries_are_rejected_one_by_one_with_a_reason(tmp_path, caplog):
    """Every entry of the wrong type or with an unsafe file name is counted; one good image is kept."""
    save_jpeg(tmp_path / "images" / "001.jpg", image_with_box((50, 40), (5, 5, 25, 20)))
    save_jpeg(tmp_path / "outside.jpg", image_with_box((50, 40), (5, 5, 25, 20)))
    (tmp_path / "images" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    data = {
        "categories": [{"id": 3, "name": "a"}],
        "images": [
            {"id": 1, "file_name": "001.jpg"},
            {"id": 2, "file_name": "bad\u0000name.jpg"},  # NUL: used to abort the whole stage (ValueError)
            {"id": 3, "file_name": "/etc/passwd"},
            {"id": 4, "file_name": "sub/../../001.jpg"},
            {"id": 5, "file_name": "C:\\images\\001.jpg"},
            {"id": 8, "file_name": "link.jpg"},  # a link inside the folder to an image outside it
            {"id": True, "file_name": "001.jpg"},  # a bool is not an id
            {"id": "6", "file_name": "001.jpg"},  # nor is a string
            {"id": 7, "file_name": ["001.jpg"]},
            "not an object",
        ],
        "annotations": [
            _ann(1),  # kept
            _ann(2, iscrowd="0"),  # a string "0": used to become a difficult box
            _ann(3, iscrowd=1),  # kept, difficult
            _ann(4, iscrowd=True),
            _ann(5, category_id=True),
            _ann(6, image_id="1"),
            _ann(True),
            ["not", "an", "object"],
            _ann(7, bbox=[5, 5, True, 15]),
            _ann(8, bbox=[5, "5", 20, 15]),
            _ann(9, bbox=[5, 5, float("inf"), 15]),  # written as Infinity, which Python's json reads back
            _ann(10, bbox=[5, 5, 10**400, 15]),  # an int no float can hold: used to raise OverflowError
            _ann(11, image_id=2),  # of the NUL-named image
            _ann(12, image_id=7),  # of the image whose file_name is a list
        ],
    }
    _write(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        result = prepare(_coco(tmp_path), tmp_path / "out", progress=False)
    [record] = result.records["train"]
    assert (record.id, record.boxes, record.difficult) == ("train/1", [[5, 5, 25, 20]] * 2, [False, True])
    report = result.report.to_dict()
    assert report["images"]["rejected_by_reason"] == {"annotation_malformed": 4, "unsafe_path": 5}
    assert report["boxes"]["rejected_by_reason"] == {
        "annotation_malformed": 6,
        "box_malformed": 2,
        "box_nonfinite": 2,
        "image_rejected": 2,
    }
    # The sums: images in = kept + rejected (10 = 1 + 9), boxes likewise (14 = 2 + 12).
    assert (report["images"]["in"], report["images"]["kept"], report["images"]["rejected"]) == (10, 1, 9)
    assert (report["boxes"]["in"], report["boxes"]["kept"], report["boxes"]["rejected"]) == (14, 2, 12)
    warned = caplog.text
    assert "'bad\\x00name.jpg'" in warned and "NUL byte" in warned  # the file is named
    assert "iscrowd: expected 0 or 1, got '0'" in warned
    assert "link.jpg" in warned and "(through a link)" in warned


@pytest.mark.parametrize("where", ["top", "inside"])
def test_deeply_nested_json_stops_the_stage_clearly(tmp_path, where):
    deep = "[" * 100_000 + "]" * 100_000
    text = deep if where == "top" else '{"images": [], "annotations": [], "categories": ' + deep + "}"
    (tmp_path / "images").mkdir()
    (tmp_path / "instances.json").write_text(text, encoding="utf-8")
    with pytest.raises(PrepareError, match="instances.json: JSON nested too deeply"):
        prepare(_coco(tmp_path), tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("key", "entries", "message"),
    [
        (
            "categories",
            [{"id": 3, "name": "a"}, {"id": 3, "name": "b"}],
            r"categories\[0\] and categories\[1\] share id 3",
        ),
        ("categories", [{"id": 3, "name": "a"}, {"id": 4, "name": "a"}], r"share name 'a'"),
        (
            "images",
            [{"id": 1, "file_name": "001.jpg"}, {"id": 1, "file_name": "002.jpg"}],
            r"images\[0\] and images\[1\] share id 1",
        ),
        ("annotations", [_ann(1), _ann(2), _ann(1)], r"annotations\[0\] and annotations\[2\] share id 1"),
    ],
)
def test_repeated_ids_stop_the_stage_naming_both_entries(tmp_path, key, entries, message):
    """Two categories with one id would merge two classes (one lost, its boxes relabelled); two images or
    annotations with one id leave it open which entry is meant."""
    data = {
        "categories": [{"id": 3, "name": "a"}],
        "images": [{"id": 1, "file_name": "001.jpg"}],
        "annotations": [_ann(1)],
        key: entries,
    }
    _write(tmp_path, data)
    with pytest.raises(PrepareError, match=message):
        prepare(_coco(tmp_path), tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "category", [{"id": "3", "name": "a"}, {"id": False, "name": "a"}, {"id": 3, "name": ""}, {"id": 3}, "a"]
)
def test_a_malformed_category_stops_the_stage(tmp_path, category):
    """A category that cannot be read would silently remove a class (and shift every later label)."""
    _write(tmp_path, {"categories": [{"id": 1, "name": "z"}, category], "images": [], "annotations": []})
    with pytest.raises(PrepareError, match=r"categories\[1\]: expected"):
        prepare(_coco(tmp_path), tmp_path / "out", progress=False)
