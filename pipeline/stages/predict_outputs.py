"""What ``python -m pipeline predict`` found, one result per input, and the files it writes them to.

``predict_images`` (``pipeline.stages.predict``) yields a ``Prediction`` for each image it read and a
``Failure`` for each it could not; ``main`` there turns them into these files in ``--out``, each written
atomically (``pipeline.artifacts.atomic_write``):

=====================  ==================================================================================
``detections.json``    ``{"info", "images", "categories", "annotations", "failed"}``: COCO ground-truth
                       layout holding results. ``images``: ``{"id", "file_name", "width", "height"}`` (ids
                       1..N in input order, upright size; ``"drawn"``: the drawn copy, relative to
                       ``--out``); ``categories``: ``{"id", "name"}`` with the model's labels 1..C-1;
                       ``annotations``: ``{"id", "image_id", "category_id", "bbox": [x, y, w, h],
                       "score", "area"}`` in original pixels (bbox to 1/100 px, score to 1e-5, per image by
                       decreasing score); ``failed``: ``{"file", "reason"}``
``results.json``       the plain COCO results list ``[{"image_id", "category_id", "bbox", "score"}]``, as
                       ``COCO.loadRes`` / ``faster_coco_eval`` read it (same ids)
``images/<name>``      each image with its detections drawn (``pipeline.report.drawing``), upright, at its
                       original size; PNG for ``.png`` inputs, JPEG otherwise; a name already taken by an
                       earlier input gets ``-2``, ``-3``, ... before its extension
``detections.parquet`` ``predict --ray`` only (it draws nothing): one row per detection, ``TABLE_COLUMNS``
                       (``detections_table``)
=====================  ==================================================================================

Both JSON files are written with one record per line (``dumps_by_record``).

Tested through the command, in ``tests/pipeline/stages/test_predict.py`` and ``test_predict_ray.py``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from pipeline.artifacts.atomic_write import write_bytes_atomic

JPEG_QUALITY = 90  # drawn copies: small files, labels still crisp
_BOX_DECIMALS = 2  # as pipeline.report.coco_eval: 1/100 pixel
_SCORE_DECIMALS = 5
# predict --ray's Parquet table: the served model's columns (pipeline.serving.pyfunc), then the image's id
TABLE_COLUMNS = ("image", "label", "class_name", "score", "x1", "y1", "x2", "y2", "image_id")


class Prediction(NamedTuple):
    """Detections of one image that was read, boxes in pixels of the upright original."""

    path: Path | str  # a local file, or an object-store URL (predict --ray)
    width: int  # upright (EXIF-oriented) size
    height: int
    boxes: np.ndarray  # float64 [K, 4] xyxy pixels, by decreasing score
    scores: np.ndarray  # float64 [K], each >= min_score
    labels: np.ndarray  # int64 [K], 1..C-1
    image: Image.Image | None  # the upright RGB image (for drawing); None once drawn


class Failure(NamedTuple):
    """An input that could not be read; ``reason`` is ``"<kind>: <detail>"``."""

    path: Path | str
    reason: str


def detections_json(
    predictions: Sequence[Prediction],
    failures: Sequence[Failure],
    classes: Sequence[str],
    *,
    drawn: Sequence[str | None] | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``detections.json`` document (see the module docstring); image ids are 1..N in ``predictions``
    order, annotation ids 1..M. ``drawn[i]``: the drawn copy of ``predictions[i]``, relative to the output
    folder (omitted when None)."""
    images, annotations = [], []
    for index, pred in enumerate(predictions):
        entry: dict[str, Any] = {
            "id": index + 1,
            "file_name": str(pred.path),
            "width": pred.width,
            "height": pred.height,
        }
        if drawn is not None and drawn[index] is not None:
            entry["drawn"] = drawn[index]
        images.append(entry)
        xy = pred.boxes[:, :2]
        wh = pred.boxes[:, 2:] - xy  # [K, 2]
        bboxes = np.round(np.concatenate([xy, wh], axis=1), _BOX_DECIMALS)  # [K, 4] xywh
        for box, score, label in zip(bboxes.tolist(), pred.scores.tolist(), pred.labels.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": int(label),
                    "bbox": box,
                    "score": round(float(score), _SCORE_DECIMALS),
                    "area": round(box[2] * box[3], _BOX_DECIMALS),
                }
            )
    return {
        "info": dict(info or {}),
        "images": images,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
        "annotations": annotations,
        "failed": [{"file": str(f.path), "reason": f.reason} for f in failures],
    }


def results_list(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The plain COCO results list of a ``detections_json`` document."""
    keys = ("image_id", "category_id", "bbox", "score")
    return [{k: a[k] for k in keys} for a in document["annotations"]]


def detections_table(predictions: Sequence[Prediction], classes: Sequence[str]) -> bytes:
    """The Parquet table of ``predict --ray`` (``TABLE_COLUMNS``), one row per detection, as file bytes.

    The columns of the served model's output (``pipeline.serving.pyfunc.OUTPUT_COLUMNS``), with ``image`` the
    input's path or URL (``file_name`` in ``detections.json``) instead of a request row, and ``image_id`` its id
    there; boxes and scores are the detector's float64 values, unrounded. Rows follow ``predictions``, each
    image's by decreasing score; an image without detections has no row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = [len(p.scores) for p in predictions]
    boxes = np.concatenate([p.boxes.reshape(-1, 4) for p in predictions]) if predictions else np.zeros((0, 4))
    labels = np.concatenate([p.labels for p in predictions]).astype(np.int64) if predictions else np.zeros(0, np.int64)
    table = pa.table(
        {
            "image": pa.array(
                [str(p.path) for p, n in zip(predictions, counts, strict=True) for _ in range(n)], pa.string()
            ),
            "label": pa.array(labels, pa.int64()),
            "class_name": pa.array([classes[label - 1] for label in labels.tolist()], pa.string()),
            "score": pa.array(np.concatenate([p.scores for p in predictions]) if predictions else [], pa.float64()),
            **{name: pa.array(boxes[:, i], pa.float64()) for i, name in enumerate(("x1", "y1", "x2", "y2"))},
            "image_id": pa.array(np.repeat(np.arange(1, len(predictions) + 1), counts), pa.int64()),
        }
    )
    assert tuple(table.column_names) == TABLE_COLUMNS
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def save_drawn(pred: Prediction, classes: Sequence[str], path: Path, *, overwrite: bool) -> None:
    from pipeline.report.drawing import draw_detections

    order = np.argsort(pred.scores, kind="stable")  # ascending: the best box is drawn last, on top
    drawn = draw_detections(pred.image, pred.boxes[order], pred.scores[order], pred.labels[order], classes)
    buffer = io.BytesIO()
    if path.suffix == ".png":
        drawn.save(buffer, format="PNG")
    else:
        drawn.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    write_bytes_atomic(path, buffer.getvalue(), overwrite=overwrite)


def dumps_by_record(document: dict[str, Any] | list[Any]) -> str:
    """JSON with one record per line: a list's items, or each top-level value (lists: item by item).

    Easy to read and to ``grep``, and a fraction of the size of ``indent=`` output with its one line per
    number; ``json.loads`` gives back ``document``.
    """

    def items(values: list[Any], pad: str) -> str:
        if not values:
            return "[]"
        return "[\n" + ",\n".join(pad + json.dumps(v, ensure_ascii=False) for v in values) + "\n" + pad[:-1] + "]"

    if isinstance(document, list):
        return items(document, " ") + "\n"
    fields = [
        f" {json.dumps(k)}: {items(v, '  ') if isinstance(v, list) else json.dumps(v, ensure_ascii=False)}"
        for k, v in document.items()
    ]
    return "{\n" + ",\n".join(fields) + "\n}\n"


def write_json(path: Path, document: dict[str, Any] | list[Any], *, overwrite: bool) -> None:
    write_bytes_atomic(path, dumps_by_record(document).encode("utf-8"), overwrite=overwrite)
