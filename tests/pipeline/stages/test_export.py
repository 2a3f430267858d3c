"""``python -m pipeline export``: the exported file against an independent PyTorch computation, its graph
and sidecar, malformed inputs and failed checks, the CLI.

The model is ssd_tiny (160 x 160 input, P = 2390 priors) with random weights, its batch norm running
statistics and heads randomised so that eval mode matters and scores and boxes are spread out
(``tests.pipeline.fixtures.random_tiny_ssd``). The export itself is tested in
``tests/pipeline/artifacts/test_onnx_export.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline.artifacts.model_file import save_model_file
from pipeline.artifacts.onnx_export import BATCH_AXIS
from pipeline.artifacts.onnx_verify import Tolerance, run_onnx, sample_images
from pipeline.config import load_params, params_to_dict
from pipeline.stages import export as export_stage
from ssd_core.deploy import DeployedSSD
from ssd_core.model import SSD_TINY_PRIORS
from tests.pipeline.fixtures import random_tiny_ssd, reference_boxes_scores

REPO = Path(__file__).resolve().parents[3]
CLASSES = ["circle", "square", "triangle"]
TOLERANCE = Tolerance()  # the stated tolerance: 1e-4 on normalised boxes and on probabilities


@pytest.fixture(scope="module")
def model():
    return random_tiny_ssd(len(CLASSES) + 1)


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "ssd.pt"
    save_model_file(path, model, classes=CLASSES, params=params_to_dict(load_params(None)))
    return path


def _args(model: Path, out: Path, *, nms: bool = False, opset: int = 17) -> argparse.Namespace:
    return argparse.Namespace(model=model, format="onnx", out=out, opset=opset, nms=nms)


# ------------------------------------------------------------------------------- boxes and scores
@pytest.fixture(scope="module")
def plain_export(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "models" / "ssd.onnx"
    assert export_stage.main(_args(model_file, out), load_params(None)) == 0
    return out


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch_forward_decode_softmax(model, plain_export, batch):
    images = sample_images(batch, model.image_size, seed=10 + batch)
    got = run_onnx(plain_export.read_bytes(), images.numpy())
    boxes, scores = reference_boxes_scores(model, images)
    assert sorted(got) == ["boxes", "scores"]
    assert got["boxes"].shape == (batch, 2390, 4) and got["scores"].shape == (batch, 2390, 4)
    assert np.abs(got["boxes"] - boxes.numpy()).max() <= TOLERANCE.boxes
    assert np.abs(got["scores"] - scores.numpy()).max() <= TOLERANCE.scores
    # The wrapper itself is the reference computation, to float rounding.
    with torch.no_grad():
        wrapped = DeployedSSD(model)(images)
    torch.testing.assert_close(wrapped.boxes, boxes, rtol=0, atol=1e-6)
    torch.testing.assert_close(wrapped.scores, scores, rtol=0, atol=1e-6)


def test_graph_declares_uint8_input_and_a_dynamic_batch(plain_export):
    graph = onnx.load(str(plain_export)).graph
    (image_input,) = graph.input
    dims = [d.dim_param or d.dim_value for d in image_input.type.tensor_type.shape.dim]
    assert image_input.name == "images" and dims == [BATCH_AXIS, 3, 160, 160]
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.type.tensor_type.shape.dim[0].dim_param for o in graph.output] == [BATCH_AXIS, BATCH_AXIS]


def test_sidecar_describes_the_export(plain_export):
    info = json.loads(plain_export.with_name("ssd.onnx.json").read_text())
    assert (info["opset"], info["image_size"], info["classes"]) == (17, 160, CLASSES)
    assert info["normalisation"]["mean"] == [0.485, 0.456, 0.406]
    assert info["normalisation"]["std"] == [0.229, 0.224, 0.225]
    assert [o["name"] for o in info["outputs"]] == ["boxes", "scores"] and info["nms"] is None
    assert info["outputs"][1]["shape"] == [BATCH_AXIS, 2390, len(CLASSES) + 1]
    assert info["size_bytes"] == plain_export.stat().st_size
    check = info["verification"]
    assert 0 <= check["max_diff_boxes"] <= TOLERANCE.boxes and 0 <= check["max_diff_scores"] <= TOLERANCE.scores
    assert info["tolerance"] == {"boxes": TOLERANCE.boxes, "scores": TOLERANCE.scores}
    props = {p.key: p.value for p in onnx.load(str(plain_export)).metadata_props}
    assert json.loads(props["classes"]) == CLASSES and props["image_size"] == "160"
    assert json.loads(props["prior_spec"]) == info["prior_spec"] == SSD_TINY_PRIORS.to_dict()


# ---------------------------------------------------------------------------------------- command
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a model file at all", "not a readable model file"),
        (None, "No such file"),
    ],
)
def test_malformed_or_missing_model_file_is_a_clear_error(tmp_path, caplog, content, message):
    path = tmp_path / "ssd.pt"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "ssd.onnx"
    with caplog.at_level(logging.ERROR):
        assert export_stage.main(_args(path, out), load_params(None)) == 2
    assert message in caplog.text and str(path) in caplog.text
    assert not out.exists()


def test_foreign_torch_file_and_bad_opset_are_rejected(tmp_path, model_file, caplog):
    foreign = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, foreign)
    with caplog.at_level(logging.ERROR):
        assert export_stage.main(_args(foreign, tmp_path / "a.onnx"), load_params(None)) == 2
        assert export_stage.main(_args(model_file, tmp_path / "b.onnx", opset=9), load_params(None)) == 2
    assert "expected a 'ssd-pipeline-model' file" in caplog.text
    assert "expected an opset in 11..20, got 9" in caplog.text
    assert not list(tmp_path.glob("*.onnx"))


def test_failed_check_writes_nothing_and_keeps_the_old_file(model_file, tmp_path, monkeypatch, caplog):
    out = tmp_path / "ssd.onnx"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(export_stage, "Tolerance", lambda: Tolerance(boxes=-1.0, scores=-1.0))  # nothing passes
    with caplog.at_level(logging.ERROR):
        assert export_stage.main(_args(model_file, out), load_params(None)) == 1
    assert "onnxruntime disagrees with PyTorch" in caplog.text
    assert out.read_bytes() == b"previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["ssd.onnx"]


@pytest.mark.slow
def test_cli_exports_with_nms_and_param_overrides(model_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "export",
        "--model",
        str(model_file),
        "--out",
        "out/ssd.onnx",
        "--opset",
        "16",
        "--nms",
        "eval.top_k=50",
        "eval.max_detections=10",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "export: out/ssd.onnx (5.0 MB, opset 16), max |diff| boxes " in output
    assert "NMS selected" in output and "Warning" not in output
    info = json.loads((tmp_path / "out" / "ssd.onnx.json").read_text())
    assert info["nms"]["top_k"] == 50 and info["nms"]["max_per_class"] == 10
    assert info["verification"]["selected_match"] is True and info["opset"] == 16
    assert [o["name"] for o in info["outputs"]] == ["boxes", "scores", "selected_indices"]
