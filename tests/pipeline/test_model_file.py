"""The model file: round trip, loadable with plain torch (no Ray, no MLflow), clear errors, atomic writes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from pipeline.model_file import load_model_file, save_model_file
from ssd_core.model import build_ssd

CLASSES = ["circle", "square", "triangle"]
PARAMS = {"seed": 7, "train": {"lr": 0.01, "milestones": [1, 2]}, "model": {"preset": "ssd_tiny"}}


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = build_ssd("ssd_tiny", len(CLASSES) + 1)
    with torch.no_grad():  # move every weight and buffer away from its initial value
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.01)
    return net.eval()


def test_round_trip_restores_weights_classes_params_and_outputs(model, tmp_path):
    path = tmp_path / "models" / "ssd.pt"
    save_model_file(path, model, classes=CLASSES, params=PARAMS)
    loaded = load_model_file(path)
    assert (loaded.preset, loaded.classes, loaded.params) == ("ssd_tiny", CLASSES, PARAMS)
    assert not loaded.model.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    images = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        expected, got = model(images), loaded.model(images)
    assert torch.equal(expected.loc, got.loc) and torch.equal(expected.cls_logits, got.cls_logits)


def test_the_file_loads_with_plain_torch_weights_only(model, tmp_path):
    path = tmp_path / "ssd.pt"
    save_model_file(path, model, classes=CLASSES, params=PARAMS)
    code = (
        "import sys, torch\n"
        f"d = torch.load({str(path)!r}, weights_only=True)\n"
        "assert not {'ray', 'mlflow', 'pipeline', 'ssd_core'} & set(sys.modules), sorted(sys.modules)\n"
        "print(d['preset'], d['num_classes'], ','.join(d['classes']), len(d['state_dict']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["ssd_tiny", "4", "circle,square,triangle", str(len(model.state_dict()))]


def test_wrong_class_count_and_wrapped_models_are_refused(model, tmp_path):
    with pytest.raises(ValueError, match="needs 3 class names; got 2"):
        save_model_file(tmp_path / "a.pt", model, classes=CLASSES[:2], params=PARAMS)

    class Wrapper(nn.Module):  # what DistributedDataParallel looks like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(TypeError, match="expected an SSD model .unwrapped., got Wrapper"):
        save_model_file(tmp_path / "b.pt", Wrapper(model), classes=CLASSES, params=PARAMS)
    assert not list(tmp_path.iterdir())


def test_torn_and_foreign_files_are_named_in_the_error(model, tmp_path):
    path = tmp_path / "ssd.pt"
    save_model_file(path, model, classes=CLASSES, params=PARAMS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{path}: not a readable model file"):
        load_model_file(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="expected a 'ssd-pipeline-model' file, found None"):
        load_model_file(path)
    with pytest.raises(FileNotFoundError):
        load_model_file(tmp_path / "missing.pt")
