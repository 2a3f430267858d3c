"""Log a trained model file as an MLflow model (pyfunc ``SsdDetector``) with its ONNX export attached.

What a logged model holds (an MLflow 3 ``LoggedModel`` of the training run, named ``MODEL_NAME``):

* ``MLmodel`` with the pyfunc flavor (``pipeline.serving.pyfunc.SsdDetector``), the signature (input
  column ``image`` binary, params ``min_score``, output ``OUTPUT_COLUMNS``), an input example (one small
  JPEG, which MLflow runs through the model before logging) and ``model_config`` (post-processing settings
  ``eval.*`` and ``prepare.max_image_pixels`` of the training params);
* ``artifacts/ssd.pt`` (the model file's own name), the model file; ``artifacts/ssd.onnx`` and
  ``artifacts/ssd.onnx.json``, the ONNX export with boxes decoded in the graph and its onnxruntime-vs-PyTorch
  parity record (``pipeline.artifacts.onnx_export``, ``onnx_verify``);
* ``requirements.txt``: the pins of ``SERVING_PACKAGES`` from ``requirements.lock`` (CPU torch), so
  ``mlflow models serve --env-manager local`` in this project's environment needs nothing else. The
  project's own packages (``pipeline``, ``ssd_core``) must be importable where the model is loaded.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_NAME = "ssd_detector"  # the LoggedModel's name in the run; not "model", the run artifact folder of ssd.pt
# (MLflow 3 lists and downloads runs:/<run>/<name> as the run's folder and the logged model together)
SERVING_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pillow", "omegaconf", "defusedxml", "cloudpickle")
EXAMPLE_SIDE = 64  # the input example: a 64x64 JPEG (small in MLmodel's folder, still a real image)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def pip_requirements(lock: str | Path, packages: tuple[str, ...] = SERVING_PACKAGES) -> list[str]:
    """``name==version`` of each of ``packages`` as pinned in the lock file ``lock`` (pip-compile output).

    Raises:
        ValueError: a package is not pinned in ``lock`` (named).
    """
    pins = {}
    for line in Path(lock).read_text(encoding="utf-8").splitlines():
        match = _PIN.match(line)
        if match:
            pins[_canonical(match.group(1))] = f"{match.group(1)}=={match.group(2)}"
    missing = [name for name in packages if _canonical(name) not in pins]
    if missing:
        raise ValueError(f"pip_requirements: {lock} pins no version of {missing}")
    return [pins[_canonical(name)] for name in packages]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def signature():
    """The model's ``ModelSignature``: see the module docstring of ``pipeline.serving.pyfunc``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from pipeline.serving.pyfunc import DEFAULT_MIN_SCORE, IMAGE_COLUMN

    outputs = Schema(
        [
            ColSpec("long", "image"),
            ColSpec("long", "label"),
            ColSpec("string", "class_name"),
            ColSpec("double", "score"),
            *(ColSpec("double", name) for name in ("x1", "y1", "x2", "y2")),
        ]
    )
    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=outputs,
        params=ParamSchema([ParamSpec("min_score", "double", DEFAULT_MIN_SCORE)]),
    )


def input_example():
    """One ``EXAMPLE_SIDE`` square JPEG of a grey gradient in the ``image`` column."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from pipeline.serving.pyfunc import IMAGE_COLUMN

    ramp = np.linspace(0, 255, EXAMPLE_SIDE, dtype=np.uint8)  # [S]
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, ::-1]), axis=-1)  # [S, S, 3]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode="RGB").save(buffer, format="JPEG", quality=90)
    return pd.DataFrame({IMAGE_COLUMN: [buffer.getvalue()]})


def model_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """``model_config`` of the MLflow model from the training params (``params_to_dict`` form)."""
    evaluation, prepare = params["eval"], params["prepare"]
    return {
        "score_threshold": float(evaluation["score_threshold"]),
        "top_k": int(evaluation["top_k"]),
        "nms_iou": float(evaluation["nms_iou"]),
        "max_detections": int(evaluation["max_detections"]),
        "max_image_pixels": int(prepare["max_image_pixels"]),
    }


def export_onnx_files(model_file: Path, folder: Path, *, opset: int = 17) -> tuple[Path, Path]:
    """``folder/ssd.onnx`` (boxes decoded in the graph) and ``folder/ssd.onnx.json`` (its parity record).

    Raises:
        ValueError: onnxruntime disagrees with PyTorch beyond ``onnx_verify.Tolerance`` (nothing written).
    """
    from pipeline.artifacts.atomic_write import write_bytes_atomic
    from pipeline.artifacts.model_file import load_model_file
    from pipeline.artifacts.onnx_export import export_onnx, metadata
    from pipeline.artifacts.onnx_verify import Tolerance, sidecar, verify_onnx

    loaded = load_model_file(model_file)
    proto = export_onnx(loaded.model, opset=opset, metadata=metadata(loaded.model, loaded.classes))
    data = proto.SerializeToString()
    tolerance = Tolerance()
    check = verify_onnx(data, loaded.model, None)
    if not check.within(tolerance):
        raise ValueError(
            f"ONNX export of {model_file}: onnxruntime disagrees with PyTorch (boxes {check.max_diff_boxes:.2g}, "
            f"scores {check.max_diff_scores:.2g}; tolerance {tolerance})"
        )
    onnx_path, json_path = folder / "ssd.onnx", folder / "ssd.onnx.json"
    write_bytes_atomic(onnx_path, data)
    info = sidecar(
        loaded.model,
        loaded.classes,
        opset=opset,
        nms=None,
        max_detections=None,
        tolerance=tolerance,
        verification=check,
        size_bytes=len(data),
    )
    write_bytes_atomic(json_path, (json.dumps(info, indent=2) + "\n").encode("utf-8"))
    return onnx_path, json_path


def save_pyfunc(path: Path, model_file: Path, params: Mapping[str, Any], lock: Path, *, mlflow_model=None) -> None:
    """Write the MLflow model folder ``path`` (must not exist) for ``model_file`` trained with ``params``."""
    import mlflow.pyfunc

    from pipeline.serving.pyfunc import SsdDetector

    with tempfile.TemporaryDirectory(prefix="ssd-onnx-") as scratch:
        onnx_path, json_path = export_onnx_files(model_file, Path(scratch))
        mlflow.pyfunc.save_model(
            str(path),
            python_model=SsdDetector(),
            artifacts={"model_file": str(model_file), "onnx": str(onnx_path), "onnx_parity": str(json_path)},
            signature=signature(),
            input_example=input_example(),
            pip_requirements=pip_requirements(lock),
            model_config=model_config(params),
            mlflow_model=mlflow_model,
        )


def log_pyfunc(
    client: Any,
    *,
    experiment_id: str,
    run_id: str,
    model_file: Path,
    params: Mapping[str, Any],
    lock: Path,
    tags: Mapping[str, str],
) -> str:
    """Log ``model_file`` as an MLflow 3 ``LoggedModel`` of run ``run_id``; returns its model id.

    The steps of ``mlflow.models.Model.log``, through ``client`` rather than the fluent API's global tracking
    URI and active run: create the LoggedModel, link it to the run as an output, write the model folder,
    upload it, mark it READY.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    logged = client.create_logged_model(
        experiment_id, name=MODEL_NAME, source_run_id=run_id, tags=dict(tags), model_type="object-detection"
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with tempfile.TemporaryDirectory(prefix="ssd-mlflow-model-") as scratch:
            folder = Path(scratch) / MODEL_NAME
            description = Model(
                artifact_path=logged.artifact_location,
                model_uuid=logged.model_id,
                run_id=run_id,
                model_id=logged.model_id,
            )
            save_pyfunc(folder, model_file, params, lock, mlflow_model=description)
            client.log_model_artifacts(logged.model_id, str(folder))
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    logger.info("logged MLflow model %s (run %s)", logged.model_id, run_id)
    return logged.model_id
