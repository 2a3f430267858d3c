"""The trained-model file (``models/ssd.pt``): weights, preset, class map and the params it was trained with.

The file is ``torch.save`` of a plain dict of tensors, strings, numbers and lists, so it loads with
``torch.load(weights_only=True)`` anywhere, without Ray, MLflow or this package's training code::

    {"format": "ssd-pipeline-model", "version": 1, "preset": "ssd_tiny", "num_classes": 4,
     "classes": ["circle", "square", "triangle"], "state_dict": {...}, "params": {...}}

``classes[i]`` is the name of label ``i + 1``; label 0 is background, so ``num_classes == len(classes) + 1``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline.artifacts.atomic_write import write_bytes_atomic
from ssd_core.model import SSD, build_ssd

MODEL_FORMAT = "ssd-pipeline-model"
MODEL_VERSION = 1


class LoadedModel(NamedTuple):
    model: SSD  # in eval mode
    classes: list[str]  # label i + 1 is classes[i]
    params: dict[str, Any]  # params_to_dict(Params) of the training run
    preset: str


def save_model_file(path: str | Path, model: SSD, *, classes: list[str], params: dict[str, Any]) -> None:
    """Write ``model`` with its class map and training params to ``path``, atomically.

    Unwrap DDP before calling (``model.module``). The file appears complete or not at all: the bytes go
    to a temporary file in the same folder, which is fsynced and then renamed over ``path``.

    Raises:
        TypeError: ``model`` is not an ``SSD`` (e.g. still wrapped in DistributedDataParallel).
        ValueError: ``len(classes) + 1 != model.num_classes``.
    """
    if not isinstance(model, SSD):
        raise TypeError(f"save_model_file: expected an SSD model (unwrapped), got {type(model).__name__}")
    classes = [str(name) for name in classes]
    if len(classes) + 1 != model.num_classes:
        raise ValueError(
            f"save_model_file: the model has {model.num_classes} classes including background, so it needs "
            f"{model.num_classes - 1} class names; got {len(classes)}: {classes}"
        )
    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "preset": model.preset,
        "num_classes": model.num_classes,
        "classes": classes,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "params": params,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(Path(path), buffer.getvalue())


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Read a file written by ``save_model_file``; the model comes back in eval mode on ``map_location``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a model file of this format, or its weights do not fit its preset.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # a torn or foreign file: say which file, keep the cause
        raise ValueError(f"{path}: not a readable model file ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: expected a {MODEL_FORMAT!r} file, found {found!r}")
    if payload.get("version") != MODEL_VERSION:
        raise ValueError(f"{path}: model file version {payload.get('version')!r}, this code reads {MODEL_VERSION}")
    model = build_ssd(payload["preset"], int(payload["num_classes"]))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"{path}: the weights do not fit preset {payload['preset']!r}: {error}") from error
    model.to(map_location).eval()
    return LoadedModel(model, list(payload["classes"]), dict(payload["params"]), payload["preset"])
