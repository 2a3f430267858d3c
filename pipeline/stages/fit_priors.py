"""``python -m pipeline fit-priors``: default-box sizes and ratios fitted to the training boxes.

Starts from the priors ``params.model`` builds and searches, level by level, for min/max sizes and aspect
ratios that raise the prior recall of the prepared index's training boxes at the model's input scale
(``ssd_core.prior_recall.fit_prior_sizes``; ``train.iou_threshold``, ``boxes.fit_trials`` candidates on at
most ``boxes.fit_max_boxes`` boxes, seeded by ``seed``). The levels, feature maps, steps and boxes per
location stay the network's, so the heads keep their shapes.

Writes ``--out``, a params snippet that ``load_params`` reads (``model.preset``, ``model.priors: custom``
and ``model.prior_spec``): merge it into ``params.yaml`` or a recipe. The recall of the fitted spec on all
training boxes is never below the starting spec's: when the fit does not beat it there, the snippet holds
the starting sizes. An existing ``--out`` is replaced only when this command wrote it (its first line).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch
import yaml

from pipeline.artifacts.atomic_write import write_text_atomic
from pipeline.config import Params
from pipeline.model_builder import prior_spec_for
from pipeline.report.boxes import boxes_of
from pipeline.sources.records import read_index
from ssd_core.prior_recall import fit_prior_sizes, prior_recall
from ssd_core.priors import PriorSpec

logger = logging.getLogger(__name__)

HEADER = "# written by python -m pipeline fit-priors"


class FitPriorsError(ValueError):
    """The fit cannot run or write (no boxes, an output this command did not write); the message says why."""


def fit_priors(index_dir: Path, params: Params) -> tuple[PriorSpec, float, float, int]:
    """``(spec, start recall, fitted recall, boxes)`` for the training boxes of ``index_dir``, all boxes scored."""
    boxes = boxes_of(read_index(index_dir, "train"))
    xyxy = boxes.xyxy[~boxes.difficult]  # [N, 4]; matching ignores difficult boxes
    if len(xyxy) == 0:
        raise FitPriorsError(f"{index_dir}: the training split has no (non-difficult) boxes to fit to")
    start = prior_spec_for(params.model)
    threshold = params.train.iou_threshold
    cap = params.boxes.fit_max_boxes
    sample = xyxy if len(xyxy) <= cap else xyxy[torch.linspace(0, len(xyxy) - 1, cap).round().long()]
    fit = fit_prior_sizes(sample, start, threshold, trials=params.boxes.fit_trials, seed=params.seed)
    fitted = _rounded(fit.spec)
    before, after = prior_recall(xyxy, start, threshold), prior_recall(xyxy, fitted, threshold)
    if after < before:
        logger.info("fit-priors: the fit (recall %.4f) does not beat the start (%.4f) on all boxes", after, before)
        fitted, after = start, before
    return fitted, before, after, len(xyxy)


def snippet(spec: PriorSpec, preset: str, note: str) -> str:
    """The params YAML for ``spec`` on ``preset``: ``model.preset``, ``model.priors: custom``, ``model.prior_spec``."""
    values = spec.to_dict()
    prior_spec = {k: values[k] for k in ("min_sizes", "max_sizes", "aspect_ratios", "steps", "clip")}
    body = yaml.safe_dump(
        {"model": {"preset": preset, "priors": "custom", "prior_spec": prior_spec}},
        default_flow_style=None,
        sort_keys=False,
    )
    return f"{HEADER}\n# {note}\n{body}"


def main(args: argparse.Namespace, params: Params) -> int:
    out = Path(args.out)
    try:
        if out.exists() and not out.read_text(encoding="utf-8", errors="replace").startswith(HEADER):
            raise FitPriorsError(f"--out {out} exists and was not written by fit-priors; choose another file")
        spec, before, after, count = fit_priors(Path(args.index), params)
    except (FileNotFoundError, ValueError) as error:
        logger.error("fit-priors: %s", error)
        return 1
    note = (
        f"{params.model.preset}, {count} training boxes of {args.index}: prior recall at IoU "
        f"{params.train.iou_threshold:g} {before:.4f} ({params.model.priors} priors) -> {after:.4f}"
    )
    write_text_atomic(out, snippet(spec, params.model.preset, note))
    logger.info("fit-priors: %s; wrote %s (merge it into params.yaml or a recipe)", note, out)
    return 0


def _rounded(spec: PriorSpec) -> PriorSpec:
    """Sizes to 0.01 px and ratios to 0.001, as the snippet writes them (the recall is scored on these)."""
    return dataclasses.replace(
        spec,
        min_sizes=tuple(round(s, 2) for s in spec.min_sizes),
        max_sizes=tuple(max(round(h, 2), round(lo, 2)) for lo, h in zip(spec.min_sizes, spec.max_sizes, strict=True)),
        aspect_ratios=tuple(tuple(max(round(r, 3), 1.001) for r in level) for level in spec.aspect_ratios),
    )
