"""``python -m pipeline fit-priors``: on boxes the preset cannot match, the fitted snippet's recall is higher,
never lower, and the snippet loads through ``load_params`` into the priors it reports."""

from __future__ import annotations

import re

import pytest

from pipeline.cli import main as cli_main
from pipeline.config import load_params
from pipeline.model_builder import build_model, prior_spec_for
from pipeline.report.boxes import boxes_of
from pipeline.sources.records import read_index
from ssd_core.model import SSD_TINY_PRIORS
from ssd_core.prior_recall import prior_recall
from tests.pipeline.stages.test_boxes import tall_box_index


@pytest.mark.slow
def test_the_fit_beats_the_preset_and_its_snippet_loads(tmp_path):
    index = tall_box_index(tmp_path / "prepared")
    out = tmp_path / "fitted.yaml"
    assert cli_main(["fit-priors", "--index", str(index), "--out", str(out), "boxes.fit_trials=200"]) == 0
    text = out.read_text()
    before, after = map(float, re.search(r"IoU 0.5 ([\d.]+) \(voc priors\) -> ([\d.]+)", text).groups())
    boxes = boxes_of(read_index(index, "train")).xyxy
    assert before == pytest.approx(prior_recall(boxes, SSD_TINY_PRIORS, 0.5), abs=1e-4) == 0.5  # the squares only
    params = load_params(out)
    assert params.model.priors == "custom" and params.model.preset == "ssd_tiny"
    spec = prior_spec_for(params.model)
    assert prior_recall(boxes, spec, 0.5) == pytest.approx(after, abs=1e-4) and after >= 0.75 > before
    assert spec.boxes_per_location == SSD_TINY_PRIORS.boxes_per_location  # the heads keep their shapes
    assert build_model(params.model, ["pole", "box"]).prior_spec == spec
    # run again: it replaces its own file
    assert cli_main(["fit-priors", "--index", str(index), "--out", str(out), "boxes.fit_trials=5"]) == 0


def test_a_file_it_did_not_write_is_not_replaced(tmp_path):
    index = tall_box_index(tmp_path / "prepared", count=4)
    out = tmp_path / "params.yaml"
    out.write_text("train:\n  lr: 0.1\n")
    assert cli_main(["fit-priors", "--index", str(index), "--out", str(out)]) == 1
    assert out.read_text() == "train:\n  lr: 0.1\n"
