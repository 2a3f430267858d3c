"""Model files and MLflow model folders shared by the serving tests.

``crafted_file``: the hand-derived model of ``tests/pipeline/stages/test_predict.py`` (every image gets the
same three detections, derived in that module's docstring). ``random_file``: an untrained ssd_tiny whose
detections vary with the image. ``crafted_pyfunc`` / ``random_pyfunc``: their MLflow model folders, written
by ``pipeline.serving.model_log.save_pyfunc`` (ONNX export and the input-example check included).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.artifacts.model_file import save_model_file
from pipeline.config import load_params, params_to_dict
from pipeline.serving.model_log import save_pyfunc
from ssd_core.model import build_ssd
from tests.pipeline.stages.test_predict import CLASSES, _craft

REPO = Path(__file__).resolve().parents[3]
LOCK = REPO / "requirements.lock"


def write_model_file(path: Path, *, crafted: bool, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    model = build_ssd("ssd_tiny", num_classes=len(CLASSES) + 1)
    if crafted:
        _craft(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_file(path, model, classes=CLASSES, params=params_to_dict(load_params(None)))
    return path


@pytest.fixture(scope="session")
def crafted_file(tmp_path_factory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("crafted") / "ssd.pt", crafted=True)


@pytest.fixture(scope="session")
def random_file(tmp_path_factory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("random") / "ssd.pt", crafted=False)


@pytest.fixture(scope="session")
def crafted_pyfunc(tmp_path_factory, crafted_file) -> Path:
    folder = tmp_path_factory.mktemp("crafted-mlflow") / "model"
    save_pyfunc(folder, crafted_file, params_to_dict(load_params(None)), LOCK)
    return folder


@pytest.fixture(scope="session")
def random_pyfunc(tmp_path_factory, random_file) -> Path:
    folder = tmp_path_factory.mktemp("random-mlflow") / "model"
    save_pyfunc(folder, random_file, params_to_dict(load_params(None)), LOCK)
    return folder
