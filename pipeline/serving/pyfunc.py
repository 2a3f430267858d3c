"""The MLflow pyfunc of a trained SSD: images in, one row per detection out, as ``python -m pipeline predict``.

``SsdDetector`` is the ``python_model`` of the logged MLflow model (``pipeline.serving.model_log``). Its
artifact ``model_file`` is the pipeline's model file (``pipeline.artifacts.model_file``); its
``model_config`` holds the post-processing settings of the params it was trained with (``eval.*``) and the
decompression-bomb limit (``prepare.max_image_pixels``).

Input: a DataFrame with a column ``image``, one image per row, as

* encoded bytes of a JPEG, PNG, ... file (the REST case: base64 in JSON, which MLflow decodes for the
  ``binary`` column of the signature); read with ``pipeline.sources.images.load_rgb`` like ``predict``
  reads a file (format allow-list, bomb guard, EXIF orientation, RGB);
* or a uint8 array ``[H, W, 3]`` RGB, already upright (Python callers: ``predict_arrays`` or the
  unwrapped model's ``predict``).

Params: ``min_score`` (default ``DEFAULT_MIN_SCORE``, predict's ``--min-score`` default).

Output: a DataFrame with one row per detection, ``OUTPUT_COLUMNS``: ``image`` (the row's position in the
input, 0-based), ``label`` (1..C-1), ``class_name``, ``score``, ``x1, y1, x2, y2`` (pixels of the upright
original), per image by decreasing score. An image without detections contributes no row.

A row that is not a usable image fails the whole request with ``MlflowException`` INVALID_PARAMETER_VALUE
naming the row and the reason (the scoring server answers 400), never a traceback.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("image", "label", "class_name", "score", "x1", "y1", "x2", "y2")
DEFAULT_MIN_SCORE = 0.3  # as `python -m pipeline predict --min-score`
DEFAULT_BATCH_SIZE = 8  # images per forward pass, as predict's --batch-size


class SsdDetector(mlflow.pyfunc.PythonModel):
    """Detect objects in the ``image`` column (encoded bytes or uint8 ``[H, W, 3]`` arrays)."""

    def load_context(self, context: Any) -> None:
        import torch

        from pipeline.artifacts.model_file import load_model_file
        from pipeline.serving.detect import DetectSettings

        config = dict(context.model_config or {})
        self._loaded = load_model_file(context.artifacts["model_file"], map_location="cpu")
        self._settings = DetectSettings(
            float(config["score_threshold"]),
            int(config["top_k"]),
            float(config["nms_iou"]),
            int(config["max_detections"]),
            DEFAULT_MIN_SCORE,
        )
        self._max_pixels = int(config["max_image_pixels"])
        self._batch_size = int(config.get("batch_size", DEFAULT_BATCH_SIZE))
        self._device = torch.device("cpu")

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            found = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise _bad_input(f"expected a DataFrame with a column {IMAGE_COLUMN!r}, got {found}")
        min_score = _min_score(params)
        return self.predict_arrays(list(model_input[IMAGE_COLUMN]), min_score=min_score)

    def predict_arrays(self, images: list[Any], *, min_score: float = DEFAULT_MIN_SCORE) -> pd.DataFrame:
        """Detections of ``images`` (each encoded bytes or a uint8 ``[H, W, 3]`` RGB array) as the output
        DataFrame of the module docstring."""
        import torch

        from pipeline.serving.detect import detect, model_input

        settings = self._settings._replace(min_score=min_score)
        size = int(self._loaded.model.image_size)
        rows: list[dict[str, Any]] = []
        for start in range(0, len(images), self._batch_size):
            chunk = [self._read(i, images[i]) for i in range(start, min(start + self._batch_size, len(images)))]
            batch = torch.stack([model_input(image, size) for image in chunk])  # uint8 [B, 3, S, S]
            found = detect(self._loaded.model, batch.to(self._device), [image.size for image in chunk], settings)
            for offset, det in enumerate(found):
                for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True):
                    rows.append(
                        {
                            "image": start + offset,
                            "label": int(label),
                            "class_name": self._loaded.classes[label - 1],
                            "score": float(score),
                            "x1": box[0],
                            "y1": box[1],
                            "x2": box[2],
                            "y2": box[3],
                        }
                    )
        return detections_frame(rows)

    def _read(self, row: int, value: Any):
        """Row ``row`` as an upright RGB PIL image; a bad row raises ``MlflowException`` naming it."""
        from PIL import Image

        from pipeline.sources.images import ImageRejected, load_rgb

        if isinstance(value, np.ndarray):
            if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3 or 0 in value.shape:
                raise _bad_input(f"row {row}: expected a uint8 array [H, W, 3], got {value.dtype} {list(value.shape)}")
            if value.shape[0] * value.shape[1] > self._max_pixels:
                raise _bad_input(
                    f"row {row}: image_too_large: {value.shape[1]}x{value.shape[0]} pixels; limit {self._max_pixels} "
                    "(prepare.max_image_pixels)"
                )
            return Image.fromarray(np.ascontiguousarray(value), mode="RGB")
        if isinstance(value, bytearray | memoryview):
            value = bytes(value)
        if not isinstance(value, bytes) or not value:
            shown = "empty bytes" if isinstance(value, bytes) else type(value).__name__
            raise _bad_input(f"row {row}: expected the encoded bytes of an image file, got {shown}")
        try:
            return load_rgb(value, max_pixels=self._max_pixels)
        except ImageRejected as error:
            raise _bad_input(f"row {row}: {error.reason}: {error.detail}") from None
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
            raise _bad_input(f"row {row}: image_unreadable: {type(error).__name__}: {error}") from None


def detections_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The output DataFrame: ``OUTPUT_COLUMNS`` with fixed dtypes, also when there is no detection."""
    frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
    return frame.astype(
        {
            "image": "int64",
            "label": "int64",
            "class_name": "object",
            "score": "float64",
            "x1": "float64",
            "y1": "float64",
            "x2": "float64",
            "y2": "float64",
        }
    )


def _min_score(params: dict[str, Any] | None) -> float:
    value = (params or {}).get("min_score", DEFAULT_MIN_SCORE)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise _bad_input(f"params.min_score: expected a number in [0, 1], got {value!r}") from None
    if not 0.0 <= score <= 1.0:
        raise _bad_input(f"params.min_score: expected a number in [0, 1], got {score}")
    return score


def _bad_input(message: str) -> MlflowException:
    return MlflowException(f"ssd model: {message}", error_code=INVALID_PARAMETER_VALUE)
