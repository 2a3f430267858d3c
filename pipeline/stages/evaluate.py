"""``python -m pipeline evaluate``: VOC and COCO mAP of the model file on the validation shards.

Steps: load the model file; run it over every validation sample (batched, ``eval_loader``); decode and
suppress with the original SSD settings (``params.eval``: score 0.01, top-k 400, NMS 0.45, 200 per image);
score the detections:

* VOC07 11-point mAP@0.5 (the SSD paper's number) and VOC2010+ area mAP@0.5 (``ssd_core.metrics``,
  difficult boxes ignored as in the devkit), per-class AP and precision-recall curves;
* COCO mAP@[.5:.95], AP50, AP75, AP small/medium/large through faster-coco-eval (``pipeline.report.coco_eval``).

Outputs (paths from the command line, i.e. from ``dvc.yaml``):

==========================  ==================================================================
``--metrics`` eval.json      summary metrics, image count, throughput, wall times (DVC metrics)
``--plots`` pr/<class>.csv   precision-recall curve per class, columns recall, precision (DVC plots)
``--plots`` per_class_ap.csv AP per class (VOC07, VOC, COCO) and ground-truth count (DVC plots)
``--out`` pr_curves.png      the PR curves, one panel per class
``--out`` detections.png     sample validation images with detections (score >= 0.3) and ground truth
``--out`` coco_gt.json       the validation ground truth in COCO format (difficult -> iscrowd)
``--out`` coco_detections.json  the detections in COCO results format, re-scorable by any COCO tool
==========================  ==================================================================

``run_wall_time_s`` in eval.json is the time since ``$SSD_RUN_STARTED`` (``make run`` sets it before it
installs anything), so it measures a whole ``make run``; it is null when the variable is not set.

With ``tracking.enabled`` the ``val/...`` metrics, the per-class table and the PNGs go to the MLflow run
that logged this model file (found by the file's sha256; a new run if none did), and the registered model
version of that run is tagged with the metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from pipeline.artifacts.atomic_write import write_csv_atomic, write_text_atomic
from pipeline.artifacts.output_folder import check_output_folder, claim_output_folder
from pipeline.config import EvalConfig, Params
from pipeline.report.coco_eval import CocoMetrics, coco_detections, coco_evaluate, coco_ground_truth
from ssd_core.metrics import PRCurve, VocResult, evaluate_voc

if TYPE_CHECKING:
    from pipeline.tracking import Tracker

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("map_voc07", "map_voc", "map_coco", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
MAX_CURVE_POINTS = 500  # PR-curve rows written per class for DVC plots
GRID_SCORE_THRESHOLD = 0.3  # detections drawn in the sample grid
RUN_STARTED_ENV = "SSD_RUN_STARTED"  # Unix time at which `make run` started (see run_wall_time_s)
EVALUATE_STAGE = "evaluate"  # the marker of the --plots and --out folders (pipeline.artifacts.output_folder)


class Sample(NamedTuple):
    """One validation image for the detection grid, boxes in the pixels of the resized ``image``."""

    key: str
    image: torch.Tensor  # uint8 [3, S, S]
    det_boxes: np.ndarray  # [K, 4]
    det_scores: np.ndarray  # [K]
    det_labels: np.ndarray  # [K]
    gt_boxes: np.ndarray  # [G, 4]
    gt_labels: np.ndarray  # [G]


class Collected(NamedTuple):
    """Everything the model saw and said, per validation image, boxes in original-image pixels."""

    keys: list[str]
    sizes: np.ndarray  # int64 [N, 2] (width, height)
    gt_boxes: list[np.ndarray]  # N x [G, 4]
    gt_labels: list[np.ndarray]  # N x [G]
    gt_difficult: list[np.ndarray]  # N x [G]
    det_boxes: list[np.ndarray]  # N x [K, 4]
    det_scores: list[np.ndarray]  # N x [K]
    det_labels: list[np.ndarray]  # N x [K]
    samples: list[Sample]
    inference_s: float  # loading + forward + post-processing


class EvalResult(NamedTuple):
    summary: dict[str, float]  # SUMMARY_KEYS -> value (NaN: undefined, e.g. no ground truth)
    voc: VocResult
    coco: CocoMetrics
    coco_gt: dict[str, Any]
    coco_dets: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def run_inference(
    model, shards: str, cfg: EvalConfig, *, device: torch.device, num_workers: int, progress: bool = True
) -> Collected:
    """Run ``model`` (an ``ssd_core.model.SSD`` in eval mode) over every validation sample of ``shards``."""
    from pipeline.shards.loader import eval_loader
    from ssd_core.augment import normalize_images
    from ssd_core.postprocess import postprocess

    loader = eval_loader(
        shards, split="val", batch_size=cfg.batch_size, image_size=model.image_size, num_workers=num_workers
    )
    priors = model.priors().to(device)  # [P, 4] cxcywh
    keys: list[str] = []
    sizes, gt_boxes, gt_labels, gt_difficult = [], [], [], []
    det_boxes, det_scores, det_labels = [], [], []
    samples: list[Sample] = []
    started = time.perf_counter()
    bar = tqdm(loader, total=len(loader), desc="evaluate", unit="batch", disable=not progress, leave=False)
    for batch in bar:
        images = normalize_images(batch.images.to(device, non_blocking=True))  # float [B, 3, S, S]
        output = model(images)
        detections = postprocess(
            output.loc,
            output.cls_logits,
            priors,
            batch.sizes.to(device),
            score_threshold=cfg.score_threshold,
            top_k=cfg.top_k,
            nms_iou=cfg.nms_iou,
            max_detections=cfg.max_detections,
        )
        for i, det in enumerate(detections):
            keys.append(str(batch.keys[i]))
            sizes.append(batch.sizes[i].tolist())
            gt_boxes.append(batch.boxes[i].cpu().numpy().astype(np.float64).reshape(-1, 4))
            gt_labels.append(batch.labels[i].cpu().numpy().astype(np.int64))
            gt_difficult.append(batch.difficult[i].cpu().numpy().astype(bool))
            det_boxes.append(det.boxes.float().cpu().numpy().astype(np.float64).reshape(-1, 4))
            det_scores.append(det.scores.float().cpu().numpy().astype(np.float64))
            det_labels.append(det.labels.cpu().numpy().astype(np.int64))
            if len(samples) < cfg.num_sample_images:
                samples.append(
                    _sample(
                        batch.images[i],
                        keys[-1],
                        sizes[-1],
                        det_boxes[-1],
                        det_scores[-1],
                        det_labels[-1],
                        gt_boxes[-1],
                        gt_labels[-1],
                    )
                )
        bar.set_postfix(images=len(keys), refresh=False)
    bar.close()
    elapsed = time.perf_counter() - started
    return Collected(
        keys,
        np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
        gt_boxes,
        gt_labels,
        gt_difficult,
        det_boxes,
        det_scores,
        det_labels,
        samples,
        elapsed,
    )


def _sample(image, key, size, det_boxes, det_scores, det_labels, gt_boxes, gt_labels) -> Sample:
    side_h, side_w = image.shape[-2:]
    scale = np.array([side_w / size[0], side_h / size[1]] * 2)  # original pixels -> resized pixels
    keep = det_scores >= GRID_SCORE_THRESHOLD
    return Sample(
        key, image.cpu(), det_boxes[keep] * scale, det_scores[keep], det_labels[keep], gt_boxes * scale, gt_labels
    )


# ------------------------------------------------------------------------------------------- scoring
def score_detections(collected: Collected, classes: list[str]) -> EvalResult:
    """VOC (ssd_core.metrics) and COCO (faster-coco-eval) metrics of the collected detections."""
    voc = evaluate_voc(
        collected.det_boxes,
        collected.det_scores,
        collected.det_labels,
        collected.gt_boxes,
        collected.gt_labels,
        collected.gt_difficult,
        num_classes=len(classes) + 1,
    )
    coco_gt = coco_ground_truth(
        collected.keys, collected.sizes, collected.gt_boxes, collected.gt_labels, collected.gt_difficult, classes
    )
    coco_dets = coco_detections(collected.det_boxes, collected.det_scores, collected.det_labels)
    coco = coco_evaluate(coco_gt, coco_dets) if collected.keys else _empty_coco(classes)
    summary = {
        "map_voc07": voc.map_voc07,
        "map_voc": voc.map_voc,
        "map_coco": coco.map,
        "ap50": coco.ap50,
        "ap75": coco.ap75,
        "ap_small": coco.ap_small,
        "ap_medium": coco.ap_medium,
        "ap_large": coco.ap_large,
    }
    return EvalResult(summary, voc, coco, coco_gt, coco_dets)


def _empty_coco(classes: list[str]) -> CocoMetrics:
    nan = float("nan")
    return CocoMetrics(*([nan] * 12), per_class_ap={i + 1: nan for i in range(len(classes))}, summary="")


# ------------------------------------------------------------------------------------------- outputs
def _finite_or_none(value: float) -> float | None:
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
                "ap_voc07": _finite_or_none(result.voc.ap_voc07[i]),
                "ap_voc": _finite_or_none(result.voc.ap_voc[i]),
                "ap_coco": _finite_or_none(result.coco.per_class_ap.get(i + 1, float("nan"))),
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
) -> dict[str, Path]:
    """Write every output file (see the module docstring); returns them by name. ``started``: the stage's
    ``time.perf_counter()`` at start; eval.json is written last, with the wall time up to then.

    Each file is written atomically; ``--plots`` and ``--out`` must be new, empty, or folders this stage
    made (``pipeline.artifacts.output_folder``), and only there are stale PR-curve CSVs deleted."""
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
    metrics = {key: _finite_or_none(value) for key, value in result.summary.items()}
    metrics.update(
        {
            "num_images": n,
            "num_detections": int(sum(len(s) for s in collected.det_scores)),
            "images_per_sec": round(n / collected.inference_s, 3) if collected.inference_s > 0 else None,
            "inference_time_s": round(collected.inference_s, 3),
            "wall_time_s": round(time.perf_counter() - started, 3),
            "run_wall_time_s": run_wall_time_s(),
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


# ------------------------------------------------------------------------------------------- tracking
def open_tracker(params: Params, model_path: Path, repo_root: Path) -> tuple[Tracker, bool]:
    """The MLflow run to report to: the one that logged this model file, else a new one. A disabled
    tracking config gives a ``NullTracker``. Raises ``TrackingError`` early if the server is unreachable."""
    from pipeline.tracking import MODEL_DIGEST_TAG, NullTracker, create_tracker, file_sha256, find_run_by_tag

    if not params.tracking.enabled:
        return NullTracker(), False
    digest = file_sha256(model_path)
    run_id = find_run_by_tag(params.tracking, repo_root, MODEL_DIGEST_TAG, digest)
    tracker = create_tracker(
        params.tracking,
        enabled_here=True,
        run_id=run_id,
        run_name=f"{params.train.run_name}-evaluate",
        repo_root=repo_root,
        resume_status=None,
    )
    if run_id is None:
        logger.warning(
            "no MLflow run logged %s (sha256 %s...); reporting to a new run %s", model_path, digest[:12], tracker.run_id
        )
        tracker.set_tags({MODEL_DIGEST_TAG: digest, "mlflow.source.name": "python -m pipeline evaluate"})
    return tracker, run_id is None


def log_to_tracking(
    tracker: Tracker,
    result: EvalResult,
    classes: list[str],
    paths: dict[str, Path],
    *,
    step: int,
    images_per_sec: float | None,
) -> None:
    """val/* metrics, per-class table, PR data and PNGs to the run; val metrics as model-version tags.
    A model already evaluated in this run (same step) is not logged again: no metric is stored twice for
    one step, so MLflow keeps the first evaluation while the DVC files hold the newest."""
    done = tracker.last_logged_step("val/map_voc07")
    if done is not None and done >= step:
        logger.warning(
            "MLflow run %s already holds an evaluation at step %d; not logging this one again "
            "(the DVC outputs are up to date)",
            tracker.run_id,
            step,
        )
        return
    metrics = {f"val/{key}": value for key, value in result.summary.items()}
    if images_per_sec is not None:
        metrics["val/images_per_sec"] = images_per_sec
    for i, name in enumerate(classes):
        metrics[f"val/ap_voc07/{name}"] = float(result.voc.ap_voc07[i])
    tracker.log_metrics(metrics, step)
    for key in ("metrics", "per_class_ap", "pr_curves_png", "detections_png"):
        tracker.log_artifact(paths[key], "evaluation")
    tracker.log_artifact(paths["pr_curves_data"], "evaluation")
    tracker.set_model_version_tags({k: v for k, v in metrics.items() if not k.startswith("val/ap_voc07/")})


# ------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace, params: Params) -> int:
    from pipeline.artifacts.model_file import load_model_file
    from pipeline.tracking import TrackingError, redact_uri

    started = time.perf_counter()
    repo_root = Path.cwd()
    try:  # before any work: folders the stage may not write into
        check_output_folder(args.plots, EVALUATE_STAGE, option="--plots")
        check_output_folder(args.out, EVALUATE_STAGE)
    except ValueError as error:
        logger.error("evaluate: %s", error)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model_file(args.model, map_location=device)
    try:
        tracker, new_run = open_tracker(params, Path(args.model), repo_root)
    except TrackingError as error:
        logger.error("%s", error)
        return 2
    try:
        num_workers = params.eval.num_workers
        logger.info(
            "evaluating %s (%s, %d classes) on %s, %s",
            args.model,
            loaded.preset,
            len(loaded.classes),
            redact_uri(str(args.shards)),
            device,
        )
        collected = run_inference(loaded.model, str(args.shards), params.eval, device=device, num_workers=num_workers)
        n = len(collected.keys)
        rate = n / collected.inference_s if collected.inference_s > 0 else float("nan")
        logger.info("inference: %d images in %.1f s (%.1f images/s)", n, collected.inference_s, rate)
        result = score_detections(collected, loaded.classes)
        paths = write_outputs(
            result,
            collected,
            loaded.classes,
            metrics_path=args.metrics,
            plots_dir=args.plots,
            out_dir=args.out,
            started=started,
        )
        for line in result.coco.summary.splitlines():
            logger.info("%s", line)
        logger.info(
            "VOC07 mAP@0.5 %.4f | VOC mAP@0.5 %.4f | COCO mAP %.4f | AP50 %.4f | AP75 %.4f",
            result.summary["map_voc07"],
            result.summary["map_voc"],
            result.summary["map_coco"],
            result.summary["ap50"],
            result.summary["ap75"],
        )
        step = int((loaded.params.get("train") or {}).get("max_steps", 0))
        log_to_tracking(
            tracker, result, loaded.classes, paths, step=step, images_per_sec=rate if math.isfinite(rate) else None
        )
    except BaseException:
        tracker.close("FAILED" if new_run else None, timeout_s=10.0)
        raise
    if not tracker.close("FINISHED" if new_run else None):
        logger.error("some evaluation results did not reach MLflow; the files above are complete")
    logger.info(
        "evaluate: wrote %s, %s, %s in %.1f s", args.metrics, args.plots, args.out, time.perf_counter() - started
    )
    return 0
