"""The MLflow model folder: signature, input example, requirements from the lock, ONNX with its parity record,
post-processing settings from the params; and the pins read from a pip-compile lock file."""

from __future__ import annotations

import json

import mlflow.pyfunc
import pytest
import yaml
from mlflow.models import Model

from pipeline.artifacts.onnx_verify import Tolerance
from pipeline.config import load_params
from pipeline.serving.model_log import SERVING_PACKAGES, model_config, pip_requirements
from tests.pipeline.serving.conftest import LOCK

LOCK_EXCERPT = """#
#    make lock
#
mlflow==3.17.2 \\
    --hash=sha256:aaaa
    # via ssd-pipeline (pyproject.toml)
Pillow==13.0.0 \\
    --hash=sha256:bbbb
torch==2.13.0 \\
    --hash=sha256:cccc
zope.interface==8.0;  python_version >= "3.9"
"""


def test_pins_come_from_the_lock_by_canonical_name(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text(LOCK_EXCERPT)
    assert pip_requirements(lock, ("torch", "pillow", "mlflow", "zope-interface")) == [
        "torch==2.13.0",
        "Pillow==13.0.0",
        "mlflow==3.17.2",
        "zope.interface==8.0",
    ]
    with pytest.raises(ValueError, match=r"pins no version of \['numpy'\]"):
        pip_requirements(lock, ("torch", "numpy"))


def test_the_projects_lock_pins_every_serving_package():
    pins = pip_requirements(LOCK)
    assert len(pins) == len(SERVING_PACKAGES) and "torch==2.13.0" in pins


@pytest.mark.slow
def test_the_model_folder(crafted_pyfunc):
    meta = Model.load(str(crafted_pyfunc / "MLmodel"))
    flavor = meta.flavors["python_function"]
    assert set(flavor["artifacts"]) == {"model_file", "onnx", "onnx_parity"}
    assert flavor["artifacts"]["model_file"]["path"] == "artifacts/ssd.pt"
    assert flavor["config"] == model_config(json.loads(json.dumps(_params())))
    signature = meta.signature
    assert signature.inputs.input_names() == ["image"] and signature.inputs.input_types()[0].name == "binary"
    assert signature.outputs.input_names() == ["image", "label", "class_name", "score", "x1", "y1", "x2", "y2"]
    assert [(p.name, p.default) for p in signature.params.params] == [("min_score", 0.3)]
    assert (crafted_pyfunc / "requirements.txt").read_text().split() == pip_requirements(LOCK)
    assert yaml.safe_load((crafted_pyfunc / "python_env.yaml").read_text())["dependencies"] == ["-r requirements.txt"]
    parity = json.loads((crafted_pyfunc / "artifacts" / "ssd.onnx.json").read_text())
    assert (crafted_pyfunc / "artifacts" / "ssd.onnx").stat().st_size == parity["size_bytes"]
    tolerance = Tolerance()
    assert parity["verification"]["max_diff_boxes"] <= tolerance.boxes == parity["tolerance"]["boxes"]
    assert parity["verification"]["max_diff_scores"] <= tolerance.scores and parity["classes"] == ["cat", "dog"]
    assert (crafted_pyfunc / "serving_input_example.json").exists()  # the REST example MLflow checked at save
    loaded = mlflow.pyfunc.load_model(str(crafted_pyfunc))
    example = meta.load_input_example(str(crafted_pyfunc))
    assert len(loaded.predict(example)) == 2  # the crafted model's two detections >= 0.3 on any image


def _params() -> dict:
    from pipeline.config import params_to_dict

    return params_to_dict(load_params(None))
