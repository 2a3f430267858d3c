"""``python -m pipeline prepare``: validate the source named by ``data.source`` into a normalised index.

Writes ``--out/{train,val,test}.jsonl`` and ``--out/classes.json`` (format: ``pipeline.sources.records``), the
synthetic images under ``--out/images/`` when ``data.source`` is ``synthetic``, and the counts by reason
to ``--report`` (a DVC metric). Bad input never crashes the stage and is never dropped silently; the stage
fails, after writing the report, when more than ``prepare.max_bad_fraction`` of the images are rejected.

``--out`` is built whole in a hidden sibling folder and swapped in when complete
(``pipeline.artifacts.output_folder.replacing_folder``): a failed run leaves the previous output as it was,
and only a folder this stage made (its ``.ssd-pipeline`` marker), an empty folder or a new one is replaced;
any other folder is refused, named, before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.artifacts.atomic_write import write_text_atomic
from pipeline.artifacts.output_folder import replacing_folder
from pipeline.config import Params
from pipeline.sources.coco import coco_candidates
from pipeline.sources.records import (
    SPLITS,
    Candidate,
    IndexRecord,
    PrepareError,
    finalize,
    resolve_classes,
    write_index,
)
from pipeline.sources.report import PrepareReport
from pipeline.sources.synthetic import CLASSES as SYNTHETIC_CLASSES
from pipeline.sources.synthetic import write_synthetic
from pipeline.sources.voc import voc_candidates

logger = logging.getLogger(__name__)

TEST_SPLIT_STREAM = 2  # the test hold-out draws from numpy's (seed, 2) stream, apart from the seeded val split


class Prepared(NamedTuple):
    records: dict[str, list[IndexRecord]]  # split -> records
    classes: list[str]
    report: PrepareReport


def collect_candidates(
    params: Params, out_dir: Path, report: PrepareReport
) -> tuple[list[Candidate], list[str] | None]:
    """Candidates from the configured source, and the source's own class list (None: discover from names)."""
    data = params.data
    if data.source == "synthetic":
        return write_synthetic(out_dir, data.synthetic), list(SYNTHETIC_CLASSES)
    if data.source == "voc":
        roots = [Path(r) for r in data.roots]
        return voc_candidates(roots, data.voc, val_fraction=data.val_fraction, seed=params.seed, report=report), None
    if data.source == "coco":
        candidates, classes = coco_candidates(data.coco, report)
        return candidates, classes
    raise ValueError(f"data.source: expected 'synthetic', 'voc' or 'coco', got {data.source!r}")


def prepare(params: Params, out_dir: Path, *, progress: bool = True) -> Prepared:
    """Read, validate and index the source; the caller writes the outputs (see ``main``)."""
    report = PrepareReport()
    candidates, source_classes = collect_candidates(params, out_dir, report)
    seen: set[str] = set()
    unique = []
    for candidate in candidates:
        if candidate.id in seen:
            report.reject_image(
                candidate.where, "duplicate_id", f"id {candidate.id!r} already used", boxes=len(candidate.objects)
            )
        else:
            seen.add(candidate.id)
            unique.append(candidate)
    unique = hold_out_test(unique, params.data.test_fraction, params.seed)
    classes = resolve_classes(unique, params.data.classes, source_classes, params.data.strict_classes)
    labels = {name: i + 1 for i, name in enumerate(classes)}
    records: dict[str, list[IndexRecord]] = {split: [] for split in SPLITS}
    with logging_redirect_tqdm():
        for candidate in tqdm(unique, desc="prepare", unit="img", disable=not progress):
            record = finalize(candidate, labels, report, max_pixels=params.prepare.max_image_pixels)
            if record is not None:
                records[candidate.split].append(record)
    records = {split: sorted(found, key=lambda r: r.id) for split, found in records.items()}  # stable order
    return Prepared(records, classes, report)


def hold_out_test(candidates: list[Candidate], fraction: float, seed: int) -> list[Candidate]:
    """``candidates`` with ``round(n * fraction)`` of the n training ones (at least one when ``fraction`` > 0 and
    n >= 2) moved to the test split, chosen by ``seed`` among the sorted ids; the others as they were."""
    train = sorted(c.id for c in candidates if c.split == "train")
    n_test = max(1, round(len(train) * fraction)) if fraction > 0 and len(train) >= 2 else 0
    order = np.random.default_rng([seed, TEST_SPLIT_STREAM]).permutation(len(train))
    chosen = {train[i] for i in order[:n_test]}
    return [dataclasses.replace(c, split="test") if c.id in chosen else c for c in candidates]


def check_bad_fraction(report: PrepareReport, max_bad_fraction: float) -> None:
    """PrepareError when nothing is usable or too large a share of the images was rejected."""
    if report.images_in == 0:
        raise PrepareError("prepare: the source holds no images (check data.source and data.root)")
    if report.images_kept == 0 or report.bad_fraction > max_bad_fraction:
        reasons = ", ".join(f"{reason} {n}" for reason, n in report.image_rejects.most_common())
        raise PrepareError(
            f"prepare: {report.images_rejected} of {report.images_in} images ({report.bad_fraction:.1%}) were "
            f"rejected, more than prepare.max_bad_fraction={max_bad_fraction:.1%} allows ({reasons}); "
            "the log names each file"
        )


def write_report(path: Path, report: PrepareReport, classes: list[str]) -> None:
    write_text_atomic(path, json.dumps({**report.to_dict(), "num_classes": len(classes)}, indent=2) + "\n")


def check_sources_outside(records: dict[str, list[IndexRecord]], out_dir: Path) -> None:
    """PrepareError when an indexed image lies inside ``out_dir``, the folder about to be replaced."""
    target = out_dir.resolve()
    for found in records.values():
        for record in found:
            if record.image.resolve().is_relative_to(target):
                raise PrepareError(
                    f"prepare: the source image {record.image} lies inside --out {out_dir}, which this stage "
                    "replaces as a whole; put the dataset outside it"
                )


def main(args: argparse.Namespace, params: Params) -> int:
    start = time.perf_counter()
    out = Path(args.out)
    try:
        with replacing_folder(out, "prepare") as build:
            result = prepare(params, build)
            check_sources_outside(result.records, out)
            write_report(args.report, result.report, result.classes)
            check_bad_fraction(result.report, params.prepare.max_bad_fraction)
            write_index(build, result.records, result.classes)
    except ValueError as error:  # PrepareError, OutputFolderError, configuration errors: the message says what
        logger.error("%s", error)
        if out.exists():
            logger.error("prepare: %s is left as it was", out)
        return 1
    logger.info(
        "%s; %d classes; %.1f s; index in %s, report in %s",
        result.report.summary(),
        len(result.classes),
        time.perf_counter() - start,
        args.out,
        args.report,
    )
    return 0
