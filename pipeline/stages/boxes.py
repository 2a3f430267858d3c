"""``python -m pipeline boxes``: will the model's priors ever match these boxes? Before any training.

Reads the prepared index's training split, writes ``--report`` (``reports/boxes.json``, a DVC metric:
prior recall overall, per class and per COCO size bucket, box sizes) and ``--plots`` (a folder this stage
owns: DVC plot data and a PNG of size and aspect histograms; ``pipeline.report.boxes``). A class or size
bucket whose prior recall is below ``boxes.min_prior_recall`` is named in a warning; the stage still
succeeds, since training can go on, just not well.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.artifacts.atomic_write import write_text_atomic
from pipeline.artifacts.output_folder import OutputFolderError, replacing_folder
from pipeline.config import Params
from pipeline.model_builder import prior_spec_for
from pipeline.report.boxes import BoxReport, box_report, boxes_of, write_plots
from pipeline.sources.records import read_classes, read_index

logger = logging.getLogger(__name__)

BOXES_STAGE = "boxes"


def report_boxes(index_dir: Path, params: Params) -> tuple[BoxReport, list[str]]:
    """The report of ``index_dir``'s training boxes for the model ``params`` describe, and the class names."""
    classes = read_classes(index_dir)
    boxes = boxes_of(read_index(index_dir, "train"))
    spec = prior_spec_for(params.model)
    report = box_report(
        boxes,
        classes,
        spec,
        iou_threshold=params.train.iou_threshold,
        min_prior_recall=params.boxes.min_prior_recall,
    )
    report.document["preset"] = params.model.preset
    report.document["priors"] = params.model.priors
    return report, classes


def main(args: argparse.Namespace, params: Params) -> int:
    try:
        report, classes = report_boxes(Path(args.index), params)
        with replacing_folder(args.plots, BOXES_STAGE, option="--plots") as build:
            write_plots(report, classes, build)
    except (FileNotFoundError, ValueError, OutputFolderError) as error:
        logger.error("boxes: %s", error)
        return 1
    write_text_atomic(Path(args.report), json.dumps(report.document, indent=2) + "\n")
    for warning in report.warnings:
        logger.warning("boxes: %s", warning)
    doc = report.document
    recall = "-" if doc["prior_recall"] is None else f"{doc['prior_recall']:.3f}"
    sizes = ", ".join(
        f"{name} {'-' if g['prior_recall'] is None else format(g['prior_recall'], '.3f')} ({g['boxes']})"
        for name, g in doc["per_size"].items()
    )
    logger.info(
        "boxes: %d training boxes; prior recall at IoU %g for %s (%s priors): %s; by size: %s; wrote %s and %s",
        doc["boxes"],
        doc["iou_threshold"],
        params.model.preset,
        params.model.priors,
        recall,
        sizes,
        args.report,
        args.plots,
    )
    return 0
