"""`python -m pipeline summary`: the headline line and the MLflow UI command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.stages.summary import headline, ui_command

REPO = Path(__file__).resolve().parents[3]


def test_headline_names_the_metrics_and_the_whole_run_time():
    line = headline(
        {"map_voc07": 0.81234, "map_voc": 0.85, "map_coco": 0.4, "num_images": 200, "run_wall_time_s": 725.4}
    )
    assert line == (
        "VOC07 mAP@0.5 0.812 | VOC mAP@0.5 0.850 | COCO mAP 0.400 on 200 validation images; "
        "the make run that measured them took 12 min 05 s (install included)"
    )


def test_headline_without_a_run_time_or_with_missing_metrics():
    line = headline({"map_voc07": None, "num_images": 3, "run_wall_time_s": None})
    assert line == "VOC07 mAP@0.5 n/a | VOC mAP@0.5 n/a | COCO mAP n/a on 3 validation images"


def test_ui_command_binds_loopback_and_points_at_the_repo_store(tmp_path):
    command = ui_command(load_params(None), tmp_path, Path("/nowhere/bin/python"))
    assert command.startswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/mlflow.db ")
    assert "--host 127.0.0.1 --port 5000" in command


def test_ui_command_for_a_server_names_the_server(tmp_path):
    params = load_params(None, ["tracking.uri=http://10.0.0.5:5000"])
    assert ui_command(params, tmp_path, Path(sys.executable)) == (
        "open http://10.0.0.5:5000 in a browser (the runs are on that MLflow server)"
    )


@pytest.mark.slow
def test_summary_command_prints_two_lines_and_fails_without_metrics(tmp_path):
    metrics = tmp_path / "eval.json"
    command = [sys.executable, "-m", "pipeline", "summary", "--metrics", str(metrics)]
    missing = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert missing.returncode == 1 and "no " in missing.stderr and "dvc repro" in missing.stderr
    metrics.write_text(json.dumps({"map_voc07": 0.9, "map_voc": 0.91, "map_coco": 0.5, "num_images": 7}))
    done = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "summary: VOC07 mAP@0.5 0.900 | VOC mAP@0.5 0.910 | COCO mAP 0.500 on 7 validation images"
    assert lines[1].startswith("compare runs: ") and "--host 127.0.0.1" in lines[1]
