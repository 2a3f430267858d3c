"""``python -m pipeline summary``: the headline of the last run and how to browse it in MLflow.

``make run`` calls it after ``dvc repro``, so the run always ends with the same two lines, whether the
stages ran or were all up to date::

    summary: VOC07 mAP@0.5 0.823 | VOC mAP@0.5 0.851 | COCO mAP 0.472 on 200 validation images; ...
    compare runs: .venv/bin/mlflow ui --backend-store-uri sqlite:////repo/mlflow.db --host 127.0.0.1 --port 5000

It reads only files (``--metrics``, default ``metrics/eval.json``) and the params; it never contacts a server.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.tracking import default_tracking_uri

logger = logging.getLogger(__name__)

UI_PORT = 5000


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def headline(metrics: dict[str, Any]) -> str:
    """One line: VOC07 / VOC / COCO mAP, image count and the wall times present in ``metrics`` (eval.json)."""

    def value(key: str) -> str:
        number = metrics.get(key)
        return f"{number:.3f}" if isinstance(number, (int, float)) else "n/a"

    line = (
        f"VOC07 mAP@0.5 {value('map_voc07')} | VOC mAP@0.5 {value('map_voc')} | COCO mAP {value('map_coco')} "
        f"on {metrics.get('num_images', '?')} validation images"
    )
    run_s = metrics.get("run_wall_time_s")
    if isinstance(run_s, (int, float)):
        line += f"; the make run that measured them took {_minutes(run_s)} (install included)"
    return line


def ui_command(params: Params, repo_root: Path, python_bin: Path) -> str:
    """The command that opens these runs in the MLflow UI on 127.0.0.1 (or the server's address)."""
    uri = default_tracking_uri(repo_root, params.tracking.uri)
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser (the runs are on that MLflow server)"
    mlflow = python_bin.parent / "mlflow"
    program = shlex.quote(str(mlflow)) if mlflow.exists() else "mlflow"
    return (
        f"{program} ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port {UI_PORT}"
        f"  # then open http://127.0.0.1:{UI_PORT}"
    )


def main(args: argparse.Namespace, params: Params) -> int:
    metrics_path = Path(args.metrics)
    try:
        metrics = json.loads(metrics_path.read_text())
    except FileNotFoundError:
        print(f"summary: no {metrics_path} yet; run `dvc repro` (or `make run`) first", file=sys.stderr)
        return 1
    except (OSError, json.JSONDecodeError) as error:
        print(f"summary: {metrics_path} is not readable JSON ({error})", file=sys.stderr)
        return 1
    if not isinstance(metrics, dict):
        print(f"summary: {metrics_path}: expected a JSON object, got {type(metrics).__name__}", file=sys.stderr)
        return 1
    print(f"summary: {headline(metrics)}")
    if params.tracking.enabled:
        print(f"compare runs: {ui_command(params, Path.cwd(), Path(sys.executable))}")
    return 0
