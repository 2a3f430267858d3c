"""PNG figures: precision-recall curves, a grid of detections on validation images, a gradient-norm heatmap.

Matplotlib's object API with the Agg canvas: no pyplot, no global figure state, no display needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pipeline.artifacts.atomic_write import write_bytes_atomic

_DPI = 100


def _save(figure: Figure, path: str | Path) -> Path:
    """Render ``figure`` as PNG and write it to ``path`` atomically (``pipeline.artifacts.atomic_write``)."""
    path = Path(path)
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _colour(label: int):
    from matplotlib import colormaps

    return colormaps["tab20"](int(label) % 20)


def pr_curves_png(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    aps: Sequence[float],
    path: str | Path,
    *,
    title: str = "precision-recall at IoU 0.5",
) -> Path:
    """One small precision-recall plot per class in a grid; each titled with its class name and AP.

    Args:
        curves: per class (recall [D], precision [D]).
        class_names: per class name.
        aps: per class AP (NaN: no ground truth).
    """
    if not len(curves) == len(class_names) == len(aps):
        raise ValueError(
            f"pr_curves_png: curves ({len(curves)}), class_names ({len(class_names)}) and aps "
            f"({len(aps)}) must have one entry per class"
        )
    n = max(1, len(curves))
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    figure = Figure(figsize=(2.6 * cols, 2.4 * rows + 0.4), layout="constrained")
    figure.suptitle(title)
    axes = figure.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(curves):
            ax.set_axis_off()
            continue
        recall, precision = (np.asarray(v, dtype=float) for v in curves[i])
        if recall.size:
            ax.plot(np.concatenate([[0.0], recall]), np.concatenate([[precision[0]], precision]), color=_colour(i + 1))
        ap = aps[i]
        ax.set_title(
            f"{class_names[i]}  AP {ap:.3f}" if not math.isnan(ap) else f"{class_names[i]}  (no GT)", fontsize=9
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("precision", fontsize=8)
        if i // cols == rows - 1:
            ax.set_xlabel("recall", fontsize=8)
    return _save(figure, path)


def detection_grid_png(
    images: Sequence[torch.Tensor | np.ndarray],
    detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    path: str | Path,
    *,
    score_threshold: float = 0.3,
    max_per_image: int = 20,
    columns: int = 4,
    titles: Sequence[str] | None = None,
) -> Path:
    """Detections drawn over images, in a grid. Ground truth dashed white, detections coloured by class.

    Args:
        images: per image uint8 [3, H, W].
        detections: per image (boxes [K, 4] xyxy in that image's pixels, scores [K], labels [K] 1..C-1).
        ground_truth: per image (boxes [G, 4] xyxy in that image's pixels, labels [G]).
        class_names: names without background (label i + 1 -> class_names[i]).
        score_threshold: detections below it are not drawn; at most ``max_per_image`` per image.
    """
    if not len(images) == len(detections) == len(ground_truth):
        raise ValueError(
            f"detection_grid_png: images ({len(images)}), detections ({len(detections)}) and "
            f"ground_truth ({len(ground_truth)}) must have one entry per image"
        )
    n = max(1, len(images))
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    figure = Figure(figsize=(3.2 * cols, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= len(images):
            continue
        image = images[i]
        image = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"detection_grid_png: image {i}: expected uint8 [3, H, W], got {image.shape}")
        ax.imshow(np.transpose(image, (1, 2, 0)))
        gt_boxes, gt_labels = (np.asarray(v) for v in ground_truth[i])
        for box in gt_boxes.reshape(-1, 4):
            ax.add_patch(
                Rectangle(
                    (box[0], box[1]),
                    box[2] - box[0],
                    box[3] - box[1],
                    fill=False,
                    edgecolor="white",
                    linestyle="--",
                    linewidth=1.0,
                )
            )
        boxes, scores, labels = (np.asarray(v) for v in detections[i])
        keep = np.flatnonzero(scores >= score_threshold)[:max_per_image]
        for k in keep:
            x1, y1, x2, y2 = boxes[k]
            colour = _colour(labels[k])
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=1.5))
            name = class_names[int(labels[k]) - 1] if 0 < int(labels[k]) <= len(class_names) else str(labels[k])
            ax.text(
                x1,
                y1,
                f"{name} {scores[k]:.2f}",
                fontsize=6,
                color="black",
                va="bottom",
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5, "linewidth": 0},
            )
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
    return _save(figure, path)


def grad_norm_heatmap_png(
    steps: Sequence[int], layers: Sequence[str], values: np.ndarray, path: str | Path, *, title: str = ""
) -> Path:
    """Heatmap of gradient norm [L, S]: layers top (input side) to bottom, steps left to right, log colour."""
    values = np.asarray(values, dtype=float)
    if values.shape != (len(layers), len(steps)):
        raise ValueError(
            f"grad_norm_heatmap_png: values must be [layers, steps] = {(len(layers), len(steps))}, got {values.shape}"
        )
    positive = values[np.isfinite(values) & (values > 0)]
    norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 1.0001)) if positive.size else None
    shown = np.where(values > 0, values, np.nan)
    figure = Figure(figsize=(min(4 + 0.15 * len(steps), 16), 1.5 + 0.22 * len(layers)), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    ax.set_yticks(range(len(layers)), labels=list(layers), fontsize=6)
    ticks = np.unique(np.linspace(0, max(len(steps) - 1, 0), num=min(len(steps), 10)).astype(int))
    ax.set_xticks(ticks, labels=[str(steps[t]) for t in ticks], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(title or "gradient L2 norm by layer")
    figure.colorbar(image, ax=ax, label="grad L2 norm")
    return _save(figure, path)
