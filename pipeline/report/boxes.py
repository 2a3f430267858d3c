"""The data report: what the training boxes look like at the model's input, and whether its priors can
match them (``reports/boxes.json``, DVC plots, PNGs).

Every image is resized to the model's ``S x S`` input, so a box of ``w x h`` pixels in a ``W x H`` image is
``w S / W x h S / H`` input pixels, and its aspect ratio there is ``(w / W) / (h / H)``. The sizes are
bucketed as COCO does, by area at the input: small < 32², medium < 96², large.

Prior recall (``ssd_core.prior_recall``): the share of boxes whose best prior has IoU >= ``iou_threshold``
(``train.iou_threshold``), overall, per class and per size bucket. Difficult (and COCO crowd) boxes are
left out: matching ignores them. Groups below ``min_prior_recall`` are named in ``below_min_prior_recall``
and in a warning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.artifacts.atomic_write import write_bytes_atomic, write_text_atomic
from pipeline.sources.records import IndexRecord
from ssd_core.prior_recall import level_best_iou
from ssd_core.priors import PriorSpec

SIZE_BUCKETS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, math.inf))  # input px²
MAX_PLOTTED_BOXES = 5000  # rows of the per-box scatter data: a sample, evenly spaced over the boxes
HISTOGRAM_BINS = 24
ASPECT_TICKS = (1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0)
MAX_CLASS_ROWS = 19  # classes drawn in sizes.png (lowest prior recall first): COCO's 80 would be 190 inches tall


class Boxes(NamedTuple):
    """The boxes of one split, flattened over images."""

    xyxy: torch.Tensor  # [N, 4] normalised to the image (and so to the resized model input)
    labels: torch.Tensor  # [N] 1-based class labels
    difficult: torch.Tensor  # [N] bool


class BoxReport(NamedTuple):
    document: dict[str, Any]  # reports/boxes.json
    warnings: list[str]  # one per group below the minimum prior recall
    width_px: np.ndarray  # [M] non-difficult boxes at the input
    height_px: np.ndarray  # [M]
    labels: np.ndarray  # [M]
    best_iou: np.ndarray  # [M]


def boxes_of(records: Sequence[IndexRecord]) -> Boxes:
    """All boxes of ``records``, normalised by their image's width and height."""
    rows, labels, difficult = [], [], []
    for record in records:
        scale = [record.width, record.height, record.width, record.height]
        rows += [[v / s for v, s in zip(box, scale, strict=True)] for box in record.boxes]
        labels += record.labels
        difficult += record.difficult
    return Boxes(
        torch.tensor(rows, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
        torch.tensor(difficult, dtype=torch.bool),
    )


def box_report(
    boxes: Boxes, classes: Sequence[str], spec: PriorSpec, *, iou_threshold: float, min_prior_recall: float
) -> BoxReport:
    """Sizes, aspect ratios and prior recall of ``boxes`` for a model with priors ``spec``.

    ``classes[i]`` names label ``i + 1``. A group without boxes has ``prior_recall`` null and is never below
    the minimum.
    """
    kept = ~boxes.difficult
    xyxy, labels = boxes.xyxy[kept], boxes.labels[kept]  # [M, 4], [M]
    side = float(spec.image_size)
    width = ((xyxy[:, 2] - xyxy[:, 0]) * side).numpy()  # [M] input pixels
    height = ((xyxy[:, 3] - xyxy[:, 1]) * side).numpy()  # [M]
    best = level_best_iou(xyxy, spec).amax(dim=0).numpy() if len(xyxy) else np.zeros(0)  # [M]
    hit = best >= iou_threshold
    area = width * height
    label_array = labels.numpy()

    def group(mask: np.ndarray) -> dict[str, Any]:
        count = int(mask.sum())
        return {
            "boxes": count,
            "prior_recall": float(hit[mask].mean()) if count else None,
            "mean_best_iou": float(best[mask].mean()) if count else None,
            "median_width_px": float(np.median(width[mask])) if count else None,
            "median_height_px": float(np.median(height[mask])) if count else None,
        }

    per_class = {name: group(label_array == i + 1) for i, name in enumerate(classes)}
    per_size = {name: group((area >= lo) & (area < hi)) for name, lo, hi in SIZE_BUCKETS}
    overall = group(np.ones(len(best), dtype=bool))
    below = [
        f"{kind} {name}: prior recall {g['prior_recall']:.3f} ({g['boxes']} boxes)"
        for kind, groups in (("class", per_class), ("size", per_size))
        for name, g in groups.items()
        if g["prior_recall"] is not None and g["prior_recall"] < min_prior_recall
    ]
    document = {
        "image_size": spec.image_size,
        "iou_threshold": iou_threshold,
        "min_prior_recall": min_prior_recall,
        "num_priors": spec.num_priors,
        "prior_spec": spec.to_dict(),
        "boxes": int(len(boxes.labels)),
        "difficult_left_out": int((~kept).sum()),
        "prior_recall": overall["prior_recall"],
        "mean_best_iou": overall["mean_best_iou"],
        "per_class": per_class,
        "per_size": per_size,
        "below_min_prior_recall": below,
    }
    warnings = [
        f"{entry} < boxes.min_prior_recall {min_prior_recall}: the rest have no prior at IoU >= {iou_threshold} "
        "and are matched only to their best prior; consider python -m pipeline fit-priors"
        for entry in below
    ]
    return BoxReport(document, warnings, width, height, label_array, best)


def write_plots(report: BoxReport, classes: Sequence[str], folder: Path) -> list[Path]:
    """DVC plot data and a PNG in ``folder``: ``prior_recall.csv`` (per class and size bucket), ``boxes.csv`` (a
    sample of boxes: width, height, best IoU) and ``sizes.png`` (histograms)."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = report.document
    lines = ["group,prior_recall,boxes"]
    for kind in ("per_class", "per_size"):
        for name, g in doc[kind].items():
            value = "" if g["prior_recall"] is None else f"{g['prior_recall']:.6f}"
            lines.append(f"{'size ' if kind == 'per_size' else ''}{_csv(name)},{value},{g['boxes']}")
    write_text_atomic(folder / "prior_recall.csv", "\n".join(lines) + "\n")
    count = len(report.labels)
    picked = np.unique(np.linspace(0, count - 1, min(count, MAX_PLOTTED_BOXES)).round().astype(int)) if count else []
    rows = ["class,width_px,height_px,best_iou"] + [
        f"{_csv(classes[report.labels[i] - 1])},{report.width_px[i]:.2f},{report.height_px[i]:.2f},"
        f"{report.best_iou[i]:.4f}"
        for i in picked
    ]
    write_text_atomic(folder / "boxes.csv", "\n".join(rows) + "\n")
    return [folder / "prior_recall.csv", folder / "boxes.csv", _sizes_png(report, classes, folder / "sizes.png")]


def _sizes_png(report: BoxReport, classes: Sequence[str], path: Path) -> Path:
    """Histograms of width, height (input px) and aspect ratio w/h (log scale): all boxes, then one row per
    class, lowest prior recall first, at most ``MAX_CLASS_ROWS`` classes. Dashed red lines: the priors' min
    sizes and aspect ratios."""
    import io

    per_class = report.document["per_class"]
    ranked = sorted(
        (i for i, name in enumerate(classes) if per_class[name]["boxes"]),
        key=lambda i: per_class[classes[i]]["prior_recall"],
    )[:MAX_CLASS_ROWS]
    groups = [("all classes", np.ones(len(report.labels), dtype=bool), report.document["prior_recall"])]
    groups += [(classes[i], report.labels == i + 1, per_class[classes[i]]["prior_recall"]) for i in ranked]
    rows = len(groups)
    figure = Figure(figsize=(12, 2.4 * rows + 0.6))
    side = report.document["image_size"]
    size_bins = np.linspace(0, side, HISTOGRAM_BINS + 1)
    aspect_bins = np.geomspace(1 / 8, 8, HISTOGRAM_BINS + 1)
    spec = report.document["prior_spec"]
    ratios = sorted({r for level in spec["aspect_ratios"] for r in level} | {1.0})
    marks = (spec["min_sizes"], spec["min_sizes"], [*ratios, *(1 / r for r in ratios)])
    for row, (name, mask, recall) in enumerate(groups):
        title = f"{name}: {int(mask.sum())} boxes, prior recall " + ("-" if recall is None else f"{recall:.2f}")
        for col, (values, bins, label) in enumerate(
            (
                (report.width_px[mask], size_bins, "width (input px)"),
                (report.height_px[mask], size_bins, "height (input px)"),
                (report.width_px[mask] / np.maximum(report.height_px[mask], 1e-9), aspect_bins, "aspect w/h"),
            )
        ):
            axes = figure.add_subplot(rows, 3, row * 3 + col + 1)
            axes.hist(values, bins=bins, color="tab:blue")
            for mark in marks[col]:  # the priors' own sizes and ratios, for comparison
                axes.axvline(mark, color="tab:red", linestyle="--", linewidth=0.8)
            if col == 2:
                axes.set_xscale("log")
                axes.set_xticks(ASPECT_TICKS, [f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ASPECT_TICKS])
                axes.minorticks_off()
            axes.set_xlabel(label, fontsize=8)
            axes.tick_params(labelsize=7)
            if col == 0:
                axes.set_title(title, fontsize=9, loc="left")
    figure.tight_layout()
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _csv(name: str) -> str:
    """A CSV field: quoted when it holds a comma or a quote."""
    return f'"{name.replace(chr(34), chr(34) * 2)}"' if ("," in name or '"' in name) else name
