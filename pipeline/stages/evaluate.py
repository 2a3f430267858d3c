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
version of that run is tagged with the metrics and the validation-data digest; ``champion`` moves to it
only if its VOC07 mAP beats the champion's on the same validation data (``decide_champion``).

Inference and scoring are in ``pipeline.stages.evaluate_scoring``, the files in
``pipeline.stages.evaluate_outputs``; this module reports to MLflow and runs the steps in order.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipeline.artifacts.output_folder import check_output_folder
from pipeline.config import Params
from pipeline.stages.evaluate_outputs import EVALUATE_STAGE, write_outputs
from pipeline.stages.evaluate_scoring import EvalResult, run_inference, score_detections

if TYPE_CHECKING:
    from pipeline.tracking import Tracker

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- tracking
def open_tracker(params: Params, model_path: str | Path, repo_root: Path) -> tuple[Tracker, bool]:
    """The MLflow run to report to: the one that logged this model file, else a new one. A disabled
    tracking config gives a ``NullTracker``. Raises ``TrackingError`` early if the server is unreachable."""
    from pipeline.storage import sha256_of
    from pipeline.tracking import MODEL_DIGEST_TAG, NullTracker, create_tracker, find_run_by_tag

    if not params.tracking.enabled:
        return NullTracker(), False
    digest = sha256_of(model_path)[0]
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


def validation_digest(shards: str) -> str:
    """sha256 of what the validation split is: the class list and each validation shard's name and sha256
    (from the manifest). Two evaluations with equal digests scored the same images and boxes."""
    import hashlib
    import json

    from pipeline.shards.manifest import load_manifest

    manifest = load_manifest(shards, verify=False)
    entries = sorted((shard.name, shard.sha256) for shard in manifest.split_shards("val"))
    return hashlib.sha256(json.dumps([list(manifest.classes), entries]).encode()).hexdigest()


def decide_champion(params: Params, repo_root: Path, run_id: str, summary: dict, shards: str) -> None:
    """Tag the registered versions of run ``run_id`` with their ``CHAMPION_METRIC`` and validation-data
    digest, then let ``pipeline.serving.registry.consider_champion`` move ``champion`` (or say why not).

    Raises:
        TrackingError: the store refused or did not answer.
    """
    from pipeline.serving.registry import CHAMPION_METRIC, VAL_DIGEST_TAG, consider_champion
    from pipeline.tracking import TrackingError, redact_uri
    from pipeline.tracking.runs import connect

    value = summary.get(CHAMPION_METRIC.removeprefix("val/"))
    if value is None or not math.isfinite(value):
        logger.warning("champion: no finite %s to compare; the champion stays", CHAMPION_METRIC)
        return
    digest = validation_digest(shards)
    uri, client = connect(params.tracking, repo_root, None)
    try:
        versions = client.search_model_versions(f"run_id='{run_id}'")
        mine = [v for v in versions if v.name == params.tracking.model_name]
        if not mine:
            logger.info("champion: run %s registered no version of %s", run_id, params.tracking.model_name)
        for version in mine:
            client.set_model_version_tag(version.name, version.version, VAL_DIGEST_TAG, digest)
            client.set_model_version_tag(version.name, version.version, CHAMPION_METRIC, str(float(value)))
            consider_champion(client, version.name, str(version.version), value=float(value), data_digest=digest)
    except Exception as error:  # MlflowException and the store's own errors: name the store, keep the cause
        raise TrackingError(redact_uri(f"champion: MLflow store {uri}: {type(error).__name__}: {error}")) from error


# ------------------------------------------------------------------------------------------- main
def main(args: argparse.Namespace, params: Params) -> int:
    from pipeline.artifacts.model_file import load_model_file
    from pipeline.storage import check_all
    from pipeline.tracking import TrackingError, redact_uri

    started = time.perf_counter()
    repo_root = Path.cwd()
    try:  # before any work: folders the stage may not write into, an object store that does not answer
        check_output_folder(args.plots, EVALUATE_STAGE, option="--plots")
        check_output_folder(args.out, EVALUATE_STAGE)
        check_all([(str(args.model), "--model"), (str(args.shards), "--shards")])
    except ValueError as error:  # StorageError is a ValueError
        logger.error("evaluate: %s", error)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model_file(args.model, map_location=device)
    try:
        tracker, new_run = open_tracker(params, args.model, repo_root)
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
    if tracker.run_id is not None and params.tracking.register_model:
        try:
            decide_champion(params, repo_root, tracker.run_id, result.summary, str(args.shards))
        except TrackingError as error:
            logger.error("%s", error)
            return 1
    logger.info(
        "evaluate: wrote %s, %s, %s in %.1f s", args.metrics, args.plots, args.out, time.perf_counter() - started
    )
    return 0
