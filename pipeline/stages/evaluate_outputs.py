"""Evaluate's files: metrics, PR curves and per-class AP for DVC, the PNGs, and the COCO JSON.

``write_outputs`` writes every file the ``pipeline.stages.evaluate`` docstring lists, each atomically, from
the ``EvalResult`` and ``Collected`` of ``pipeline.report.scoring``. ``--plots`` and ``--out`` must
be new, empty, or folders this stage made (``pipeline.artifacts.output_folder``); only there are stale
PR-curve CSVs deleted. eval.json is written last.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts.atomic_write import write_csv_atomic, write_text_atomic
from pipeline.artifacts.output_folder import claim_output_folder
from pipeline.report.scoring import GRID_SCORE_THRESHOLD, Collected, EvalResult
from ssd_core.metrics import PRCurve

logger = logging.getLogger(__name__)

MAX_CURVE_POINTS = 500  # PR-curve rows written per class for DVC plots
RUN_STARTED_ENV = "SSD_RUN_STARTED"  # Unix time at which `make run` started (see run_wall_time_s)
EVALUATE_STAGE = "evaluate"  # the marker of the --plots and --out folders (pipeline.artifacts.output_folder)


def finite_or_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 6)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"


def decimate_curve(curve: PRCurve, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of ``curve`` with at most ``max_points`` points, first and last kept."""
    n = curve.recall.size
    if n <= max_points:
        return curve.recall, curve.precision
    index = np.unique(np.linspace(0, n - 1, max_points).round().astype(int))
    return curve.recall[index], curve.precision[index]


def per_class_rows(result: EvalResult, classes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for i, name in enumerate(classes):
        rows.append(
            {
                "class": name,
                "ap_voc07": finite_or_none(result.voc.ap_voc07[i]),
                "ap_voc": finite_or_none(result.voc.ap_voc[i]),
                "ap_coco": finite_or_none(result.coco.per_class_ap.get(i + 1, float("nan"))),
                "num_positives": int(result.voc.num_positives[i]),
            }
        )
    return rows


def write_outputs(
    result: EvalResult,
    collected: Collected,
    classes: list[str],
    *,
    metrics_path: Path,
    plots_dir: Path,
    out_dir: Path,
    started: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write every output file (see the module docstring); returns them by name. ``started``: the stage's
    ``time.perf_counter()`` at start; eval.json is written last, with the wall time up to then.

    Each file is written atomically; ``--plots`` and ``--out`` must be new, empty, or folders this stage
    made (``pipeline.artifacts.output_folder``), and only there are stale PR-curve CSVs deleted. ``extra``: more
    JSON values for eval.json (the split scored, which weights the model file holds)."""
    from pipeline.report.plots import detection_grid_png, pr_curves_png

    paths: dict[str, Path] = {}
    claim_output_folder(plots_dir, EVALUATE_STAGE, option="--plots")
    pr_dir = plots_dir / "pr"
    pr_dir.mkdir(parents=True, exist_ok=True)
    for stale in pr_dir.glob("*.csv"):  # curves of classes an earlier run had, in a folder this stage made
        stale.unlink()
    for i, (name, curve) in enumerate(zip(classes, result.voc.curves, strict=True)):
        recall, precision = decimate_curve(curve)
        rows = zip(np.round(recall, 6).tolist(), np.round(precision, 6).tolist(), strict=True)
        write_csv_atomic(pr_dir / f"{i + 1:02d}_{_slug(name)}.csv", ["recall", "precision"], rows)
    paths["pr_curves_data"] = pr_dir
    table = plots_dir / "per_class_ap.csv"
    rows = per_class_rows(result, classes)
    columns = ["class", "ap_voc07", "ap_voc", "ap_coco", "num_positives"]
    write_csv_atomic(table, columns, ([row[c] for c in columns] for row in rows))
    paths["per_class_ap"] = table

    claim_output_folder(out_dir, EVALUATE_STAGE)
    paths["pr_curves_png"] = pr_curves_png(
        [(c.recall, c.precision) for c in result.voc.curves],
        classes,
        result.voc.ap_voc07.tolist(),
        out_dir / "pr_curves.png",
        title=f"precision-recall at IoU 0.5 (VOC07 mAP {result.voc.map_voc07:.3f})",
    )
    samples = collected.samples
    paths["detections_png"] = detection_grid_png(
        [s.image for s in samples],
        [(s.det_boxes, s.det_scores, s.det_labels) for s in samples],
        [(s.gt_boxes, s.gt_labels) for s in samples],
        classes,
        out_dir / "detections.png",
        score_threshold=GRID_SCORE_THRESHOLD,
        titles=[s.key for s in samples],
    )
    paths["coco_gt"] = out_dir / "coco_gt.json"
    write_text_atomic(paths["coco_gt"], json.dumps(result.coco_gt))
    paths["coco_detections"] = out_dir / "coco_detections.json"
    write_text_atomic(paths["coco_detections"], json.dumps(result.coco_dets))
    n = len(collected.keys)
    metrics = {key: finite_or_none(value) for key, value in result.summary.items()}
    metrics.update(
        {
            "num_images": n,
            "num_detections": int(sum(len(s) for s in collected.det_scores)),
            "images_per_sec": round(n / collected.inference_s, 3) if collected.inference_s > 0 else None,
            "inference_time_s": round(collected.inference_s, 3),
            "wall_time_s": round(time.perf_counter() - started, 3),
            "run_wall_time_s": run_wall_time_s(),
            **(extra or {}),
        }
    )
    write_text_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    paths["metrics"] = metrics_path
    return paths


def run_wall_time_s(now: float | None = None) -> float | None:
    """Seconds since ``$SSD_RUN_STARTED`` (Unix time, set by ``make run`` before it installs anything), so
    eval.json records how long the whole ``make run`` took up to its last stage; None when not set."""
    started = os.environ.get(RUN_STARTED_ENV, "").strip()
    if not started:
        return None
    try:
        elapsed = (time.time() if now is None else now) - float(started)
    except ValueError:
        logger.warning("%s=%r is not a Unix time; run_wall_time_s left empty", RUN_STARTED_ENV, started)
        return None
    return round(elapsed, 1) if elapsed >= 0 else None
