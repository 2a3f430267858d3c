"""``python -m pipeline boxes``: the report, plots and warnings for a prepared index, through the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from pipeline.cli import main as cli_main
from pipeline.sources.records import IndexRecord, write_index


def tall_box_index(folder: Path, count: int = 60, seed: int = 1) -> Path:
    """An index of 320 x 320 images, each with one 16 x 80 px box (1:5; 8 x 40 px at ssd_tiny's 160 input,
    thinner than its thinnest 1:3 prior) of class "pole" at a seeded place, and one 100 x 100 px "box"."""
    generator = torch.Generator().manual_seed(seed)
    records = []
    for i in range(count):
        x, y = (torch.rand(2, generator=generator) * 200 + 20).tolist()
        records.append(
            IndexRecord(
                f"img-{i}",
                folder / f"img-{i}.jpg",
                320,
                320,
                [[x, y, x + 16, y + 80], [110, 110, 210, 210]],
                [1, 2],
                [False, False],
            )
        )
    write_index(folder, {"train": records, "val": records[:2]}, ["pole", "box"])
    return folder


def test_the_stage_reports_and_warns_by_name(tmp_path, caplog):
    index = tall_box_index(tmp_path / "prepared")
    report, plots = tmp_path / "reports" / "boxes.json", tmp_path / "reports" / "boxes"
    argv = ["boxes", "--index", str(index), "--report", str(report), "--plots", str(plots)]
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert cli_main([*argv, "boxes.min_prior_recall=0.5"]) == 0
    doc = json.loads(report.read_text())
    assert doc["preset"] == "ssd_tiny" and doc["priors"] == "voc" and doc["boxes"] == 120
    assert doc["per_class"]["pole"]["prior_recall"] == 0.0 and doc["per_class"]["box"]["boxes"] == 60
    assert doc["below_min_prior_recall"][0] == "class pole: prior recall 0.000 (60 boxes)"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("class pole: prior recall 0.000" in w for w in warnings)
    assert not any("class box" in w for w in warnings)
    assert {p.name for p in plots.iterdir()} == {".ssd-pipeline", "prior_recall.csv", "boxes.csv", "sizes.png"}


def test_a_plots_folder_of_someone_else_is_refused(tmp_path):
    index = tall_box_index(tmp_path / "prepared", count=4)
    plots = tmp_path / "mine"
    plots.mkdir()
    (plots / "notes.txt").write_text("keep")
    argv = ["boxes", "--index", str(index), "--report", str(tmp_path / "b.json"), "--plots", str(plots)]
    assert cli_main(argv) == 1
    assert (plots / "notes.txt").read_text() == "keep" and not (tmp_path / "b.json").exists()
