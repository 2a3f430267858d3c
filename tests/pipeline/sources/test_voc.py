"""VOC sources: VOCdevkit trees (split lists, several roots), flat folders (detected or named), real data."""

from __future__ import annotations

import json
import logging
import os
from argparse import Namespace
from pathlib import Path

import pytest

from pipeline.shards.manifest import load_manifest
from pipeline.sources.records import read_classes, read_index
from pipeline.sources.voc import seeded_split
from pipeline.stages import prepare as prepare_stage
from pipeline.stages import shard as shard_stage
from pipeline.stages.prepare import prepare
from tests.pipeline.fixtures import Obj, make_flat_voc, make_params, make_voc_tree, voc_xml, write_voc_sample


def _voc(roots, **extra):
    return make_params(**{"data.source": "voc", "data.root": roots, **extra})


def test_tree_splits_come_from_the_lists_and_boxes_are_converted(tmp_path):
    truth = make_voc_tree(tmp_path / "VOC2007", trainval=["000001", "000002", "000003"], test=["000004", "000005"])
    result = prepare(_voc(str(tmp_path / "VOC2007")), tmp_path / "out", progress=False)
    assert [r.id for r in result.records["train"]] == ["VOC2007/000001", "VOC2007/000002", "VOC2007/000003"]
    assert [r.id for r in result.records["val"]] == ["VOC2007/000004", "VOC2007/000005"]
    assert result.classes == ["cat", "dog"]  # discovered, sorted; "unlisted0" contributes nothing
    assert result.report.images_in == 5
    for record in result.records["train"] + result.records["val"]:
        objects = truth[record.id.split("/")[1]]
        # VOC's 1-based inclusive (xmin, xmax) = (3, 12) covers the continuous interval [2, 12].
        assert record.boxes == [[o.xmin - 1.0, o.ymin - 1.0, float(o.xmax), float(o.ymax)] for o in objects]
        assert record.labels == [1 if o.name == "cat" else 2 for o in objects]
        assert record.difficult == [bool(o.difficult) for o in objects]
        assert (record.width, record.height, record.reencode) == (48, 40, False)


def test_two_roots_combine_as_voc07_plus_12(tmp_path):
    make_voc_tree(tmp_path / "VOC2007", trainval=["a1", "a2"], test=["a3"])
    make_voc_tree(tmp_path / "VOC2012", trainval=["b1", "a1"], test=[])  # same stem "a1" in both roots
    (tmp_path / "VOC2012" / "ImageSets" / "Main" / "test.txt").unlink()  # VOC2012 has no test list
    result = prepare(_voc([str(tmp_path / "VOC2007"), str(tmp_path / "VOC2012")]), tmp_path / "out", progress=False)
    assert [r.id for r in result.records["train"]] == ["VOC2007/a1", "VOC2007/a2", "VOC2012/a1", "VOC2012/b1"]
    assert [r.id for r in result.records["val"]] == ["VOC2007/a3"]


def test_listed_id_without_xml_is_a_counted_reject(tmp_path):
    make_voc_tree(tmp_path / "VOC", trainval=["x1", "x2"], test=["x3"])
    (tmp_path / "VOC" / "Annotations" / "x2.xml").unlink()
    result = prepare(_voc(str(tmp_path / "VOC")), tmp_path / "out", progress=False)
    assert result.report.image_rejects == {"annotation_missing": 1}
    assert [r.id for r in result.records["train"]] == ["VOC/x1"]


def test_listed_ids_that_leave_the_annotation_folder_are_counted_rejects(tmp_path, caplog):
    """``../../outside/evil`` in an ImageSets list used to read ``outside/evil.xml`` (here a valid annotation of
    a dataset image, so the old code kept it as a sample); every id with a separator or ``..`` is refused."""
    make_voc_tree(tmp_path / "VOC", trainval=["x1", "x2"], test=["x3"])
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil.xml").write_text(voc_xml("x1.jpg", (48, 40), [Obj("cat", 3, 4, 12, 30)]))
    bad = ["../../outside/evil", "..\\..\\outside\\evil", "sub/x1", "..", "/abs/evil"]
    lists = tmp_path / "VOC" / "ImageSets" / "Main"
    (lists / "trainval.txt").write_text("x1\n" + "\n".join(bad) + "\nx2\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        result = prepare(_voc(str(tmp_path / "VOC")), tmp_path / "out", progress=False)
    assert [r.id for r in result.records["train"]] == ["VOC/x1", "VOC/x2"]
    assert result.report.image_rejects == {"unsafe_path": len(bad)}
    report = result.report.to_dict()
    assert report["images"]["in"] == report["images"]["kept"] + report["images"]["rejected"] == 3 + len(bad)
    for stem in bad:
        assert repr(stem) in caplog.text, stem  # the id is named, with the list folder
    assert str(lists) in caplog.text


def test_flat_folder_is_detected_and_split_by_seed(tmp_path):
    make_flat_voc(tmp_path / "flat", 20)
    params = _voc(str(tmp_path / "flat"), **{"data.val_fraction": 0.25, "seed": 3})
    first = prepare(params, tmp_path / "o1", progress=False)
    again = prepare(params, tmp_path / "o2", progress=False)
    other = prepare(
        _voc(str(tmp_path / "flat"), **{"data.val_fraction": 0.25, "seed": 4}), tmp_path / "o3", progress=False
    )
    val_ids = [r.id for r in first.records["val"]]
    assert len(val_ids) == 5 and len(first.records["train"]) == 15  # round(20 * 0.25)
    assert val_ids == [r.id for r in again.records["val"]]
    assert val_ids != [r.id for r in other.records["val"]]
    assert set(val_ids).isdisjoint(r.id for r in first.records["train"])


def test_flat_folder_with_configured_names_and_xml_beside_images(tmp_path):
    make_flat_voc(tmp_path / "named", 4, ann_name="labels_xml", img_name="pictures")
    params = _voc(
        str(tmp_path / "named"), **{"data.voc.annotations_dir": "labels_xml", "data.voc.images_dir": "pictures"}
    )
    assert prepare(params, tmp_path / "o1", progress=False).report.images_kept == 4
    make_flat_voc(tmp_path / "beside", 3, ann_name=".", img_name=".")
    assert prepare(_voc(str(tmp_path / "beside")), tmp_path / "o2", progress=False).report.images_kept == 3


def test_image_found_by_stem_when_filename_is_stale(tmp_path):
    write_voc_sample(
        tmp_path / "r" / "annotations",
        tmp_path / "r" / "images",
        "pic",
        (30, 20),
        [Obj("x", 2, 2, 10, 10)],
        name="old_name.JPG",
    )
    (tmp_path / "r" / "images" / "pic.jpg").rename(tmp_path / "r" / "images" / "pic.JPEG")
    result = prepare(_voc(str(tmp_path / "r"), **{"data.val_fraction": 0.5}), tmp_path / "o", progress=False)
    assert result.report.images_kept == 1
    assert result.records["train"][0].image.name == "pic.JPEG"


def test_missing_root_and_empty_folder_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        prepare(_voc(str(tmp_path / "nope")), tmp_path / "o", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a VOCdevkit tree"):
        prepare(_voc(str(tmp_path / "empty")), tmp_path / "o", progress=False)


def test_seeded_split_sizes():
    assert seeded_split([], 0.1, 0) == {"train": [], "val": []}
    assert seeded_split(["a"], 0.1, 0) == {"train": ["a"], "val": []}
    assert len(seeded_split(["a", "b"], 0.1, 0)["val"]) == 1  # at least one once there are two
    split = seeded_split([f"{i}" for i in range(200)], 0.1, 0)
    assert len(split["val"]) == 20 and len(split["train"]) == 180


RACCOON = os.environ.get("SSD_RACCOON_DIR", "")


@pytest.mark.skipif(
    not RACCOON or not Path(RACCOON).is_dir(),
    reason="SSD_RACCOON_DIR is unset or not a directory (CI sets it to ../shared/datasets/raccoon)",
)
def test_raccoon_real_data_through_prepare_and_shard(tmp_path):
    """The README of the set: 200 photos, 217 boxes, one class; 3 are grayscale."""
    params = _voc(RACCOON)
    args = Namespace(out=tmp_path / "prepared", report=tmp_path / "prepare.json", index=tmp_path / "prepared")
    assert prepare_stage.main(args, params) == 0
    report = json.loads((tmp_path / "prepare.json").read_text())
    assert (report["images"]["in"], report["images"]["kept"]) == (200, 200)
    assert (report["boxes"]["in"], report["boxes"]["kept"]) == (217, 217)
    assert report["images"]["corrected_by_reason"].get("converted_to_rgb") == 3
    assert read_classes(tmp_path / "prepared") == ["raccoon"]
    assert sum(len(read_index(tmp_path / "prepared", s)) for s in ("train", "val")) == 200

    assert shard_stage.main(Namespace(index=tmp_path / "prepared", out=tmp_path / "shards"), params) == 0
    manifest = load_manifest(str(tmp_path / "shards"), verify=True)
    totals = manifest.to_dict()["totals"]
    assert (totals["samples"], totals["boxes"]) == (200, 217)
    assert manifest.classes == ["raccoon"]
