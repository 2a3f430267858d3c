"""The hostile corpus: for every bad input, what prepare kept, rejected, corrected and reported."""

from __future__ import annotations

import json
import logging
from argparse import Namespace
from collections import Counter

import pytest

from pipeline.sources.records import read_index
from pipeline.stages import prepare as prepare_stage
from tests.pipeline.fixtures import make_hostile_corpus, make_params

CLASSES = ["cat", "dog"]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Run the prepare stage's main() on the corpus once; the report, the index and the log are checked below."""
    base = tmp_path_factory.mktemp("hostile")
    cases = make_hostile_corpus(base / "corpus")
    params = make_params(
        **{
            "data.source": "voc",
            "data.root": str(base / "corpus"),
            "data.classes": CLASSES,
            "prepare.max_bad_fraction": 1.0,
            "data.val_fraction": 0.5,
        }
    )
    handler, logger = _Capture(), logging.getLogger("pipeline")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        code = prepare_stage.main(Namespace(out=base / "index", report=base / "prepare.json"), params)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert code == 0
    records = {r.id.split("/", 1)[1]: r for split in ("train", "val") for r in read_index(base / "index", split)}
    report = json.loads((base / "prepare.json").read_text())
    return cases, records, report, handler.messages


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[tuple[int, str]] = []

    def emit(self, record):
        self.messages.append((record.levelno, record.getMessage()))


def test_the_corpus_covers_at_least_twenty_cases(hostile):
    cases, *_ = hostile
    assert len(cases) >= 20
    assert len({c.rejected for c in cases if c.rejected}) >= 8  # distinct image reject reasons


def test_each_case_is_kept_or_rejected_as_expected(hostile):
    cases, records, _, _ = hostile
    for case in cases:
        if case.rejected:
            assert case.stem not in records, f"{case.stem}: should have been rejected ({case.rejected})"
            continue
        assert case.stem in records, f"{case.stem}: should have been kept"
        record = records[case.stem]
        if case.kept_boxes is not None:
            assert record.boxes == [[float(v) for v in b] for b in case.kept_boxes], case.stem
        if case.size is not None:
            assert (record.width, record.height) == case.size, case.stem
        if case.difficult is not None:
            assert record.difficult == case.difficult, case.stem
        if case.reencode is not None:
            assert record.reencode == case.reencode, case.stem


def test_report_counts_each_reason_and_adds_up(hostile):
    cases, records, report, _ = hostile
    images, boxes = report["images"], report["boxes"]
    assert images["in"] == len(cases)
    assert images["kept"] == len(records) == sum(not c.rejected for c in cases)
    assert images["rejected_by_reason"] == dict(Counter(c.rejected for c in cases if c.rejected))
    assert images["in"] == images["kept"] + images["rejected"]

    expected_box_rejects = Counter()
    for case in cases:
        expected_box_rejects.update(case.box_rejects)
    assert boxes["rejected_by_reason"] == dict(expected_box_rejects)
    assert boxes["kept"] == sum(len(c.kept_boxes) for c in cases if not c.rejected)
    assert boxes["in"] == boxes["kept"] + boxes["rejected"] == boxes["kept"] + sum(expected_box_rejects.values())

    expected_fixes = Counter(fix for c in cases for fix in c.image_fixes)
    assert images["corrected_by_reason"] == dict(expected_fixes)
    expected_box_fixes = Counter()
    for case in cases:
        expected_box_fixes.update(case.box_fixes)
    assert boxes["corrected_by_reason"] == dict(expected_box_fixes)
    assert report["notes"] == {"images_without_annotation": 1}  # orphan.jpg
    assert report["bad_fraction"] == pytest.approx(images["rejected"] / images["in"], abs=1e-6)


def test_every_affected_file_is_named_in_the_log(hostile):
    cases, _, _, messages = hostile
    warnings = " ".join(text for level, text in messages if level >= logging.WARNING)
    infos = " ".join(text for _, text in messages)
    for case in cases:
        if case.rejected or case.box_rejects:
            assert f"{case.stem}.xml" in warnings, case.stem
        if case.image_fixes or case.box_fixes:
            assert f"{case.stem}.xml" in infos, case.stem


def test_unsafe_xml_is_refused_without_reading_the_entity(hostile):
    _, records, _, messages = hostile
    assert not any("root:x:0" in text for _, text in messages)  # /etc/passwd's first line never shows up
    assert "xml_external_entity" not in records and "xml_billion_laughs" not in records


def test_stage_fails_clearly_above_max_bad_fraction(tmp_path, caplog):
    cases = make_hostile_corpus(tmp_path / "corpus")
    bad = sum(bool(c.rejected) for c in cases) / len(cases)
    params = make_params(
        **{
            "data.source": "voc",
            "data.root": str(tmp_path / "corpus"),
            "data.classes": CLASSES,
            "prepare.max_bad_fraction": round(bad - 0.01, 4),
        }
    )
    args = Namespace(out=tmp_path / "index", report=tmp_path / "prepare.json")
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        assert prepare_stage.main(args, params) == 1
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "prepare.max_bad_fraction" in message and "xml_unsafe" in message
    assert (tmp_path / "prepare.json").is_file()  # the report is written, so the reasons can be read
    assert not (tmp_path / "index" / "train.jsonl").exists()  # no index from a failed run


def test_strict_classes_fails_naming_file_and_class(tmp_path, caplog):
    make_hostile_corpus(tmp_path / "corpus")
    params = make_params(
        **{
            "data.source": "voc",
            "data.root": str(tmp_path / "corpus"),
            "data.classes": CLASSES,
            "data.strict_classes": True,
            "prepare.max_bad_fraction": 1.0,
        }
    )
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        code = prepare_stage.main(Namespace(out=tmp_path / "index", report=tmp_path / "r.json"), params)
    assert code == 1
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "'zebra'" in message and "unknown_class.xml" in message and "data.strict_classes" in message
