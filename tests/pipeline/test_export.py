"""ONNX export: onnxruntime against an independent PyTorch computation, in-graph NMS against ssd_core, the CLI.

The model is ssd_tiny (160 x 160 input, P = 2390 priors) with random weights, its batch norm running
statistics and heads randomised so that eval mode matters and scores and boxes are spread out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipeline.config import load_params, params_to_dict
from pipeline.model_file import save_model_file
from pipeline.onnx_export import (
    BATCH_AXIS,
    NmsSettings,
    Tolerance,
    detections_from_selected,
    export_onnx,
    reference_selected_indices,
    run_onnx,
    sample_images,
)
from pipeline.stages import export as export_stage
from ssd_core.augment import normalize_images
from ssd_core.coding import decode_boxes
from ssd_core.deploy import DeployedSSD
from ssd_core.model import build_ssd
from ssd_core.postprocess import nms, postprocess

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["circle", "square", "triangle"]
TOLERANCE = Tolerance()  # the stated tolerance: 1e-4 on normalised boxes and on probabilities


def _random_tiny(seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_ssd("ssd_tiny", len(CLASSES) + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # eval uses these, batch statistics would not
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        for head in [*model.conf, *model.loc]:  # spread the scores and move boxes off their priors
            head.weight.normal_(0.0, 0.05, generator=generator)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return _random_tiny()


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "ssd.pt"
    save_model_file(path, model, classes=CLASSES, params=params_to_dict(load_params(None)))
    return path


def _args(model: Path, out: Path, *, nms: bool = False, opset: int = 17) -> argparse.Namespace:
    return argparse.Namespace(model=model, format="onnx", out=out, opset=opset, nms=nms)


def _reference(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes and scores computed without the wrapper: normalise, forward, decode + clip, softmax."""
    with torch.no_grad():
        out = model(normalize_images(images))
        boxes = decode_boxes(out.loc, model.priors()).clamp(0.0, 1.0)  # [B, P, 4]
        scores = torch.softmax(out.cls_logits, dim=-1)  # [B, P, C]
    return boxes, scores


def _slow_selected(boxes: torch.Tensor, scores: torch.Tensor, settings: NmsSettings) -> np.ndarray:
    """One ssd_core.nms call per (image, foreground class): top_k by score (ties: lower prior), those above
    the threshold, greedy NMS, the first max_per_class. Rows (batch, label, prior) in graph order."""
    rows = []
    for b in range(boxes.shape[0]):
        for label in range(1, scores.shape[2]):
            s = scores[b, :, label]
            candidates = torch.sort(s, descending=True, stable=True).indices[: settings.top_k]
            candidates = candidates[s[candidates] > settings.score_threshold]
            kept = candidates[nms(boxes[b, candidates], s[candidates], settings.iou_threshold)]
            rows += [(b, label, int(p)) for p in kept[: settings.max_per_class]]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


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
    boxes, scores = _reference(model, images)
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


def test_export_leaves_the_model_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, opset=13)
    assert not model.training and all(m.training is False for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="eval mode"):
        export_onnx(build_ssd("ssd_tiny", 2))  # fresh modules are in training mode


# ------------------------------------------------------------------------------------------- NMS
def _nms_case(model, settings: NmsSettings, images: torch.Tensor):
    data = export_onnx(model, opset=17, nms=settings).SerializeToString()
    got = run_onnx(data, images.numpy())
    return got, _slow_selected(torch.from_numpy(got["boxes"]), torch.from_numpy(got["scores"]), settings)


@pytest.mark.parametrize(
    ("score_threshold", "iou", "top_k", "max_detections", "cap_binds"),
    [
        (0.01, 0.45, 400, 200, True),  # the evaluation defaults: all pass, top_k cuts 2390 -> 400, cap 200
        (0.3, 0.3, 25, 7, True),  # a real threshold, a small top_k and a small per-class cap
        # cap = top_k: NMS leaves fewer than top_k, so a graph without the top_k cut would select more.
        (0.01, 0.45, 25, 200, False),
    ],
)
def test_nms_graph_selects_what_ssd_core_nms_selects(model, score_threshold, iou, top_k, max_detections,
                                                     cap_binds):  # fmt: skip
    settings = NmsSettings.from_eval(score_threshold, iou, top_k, max_detections)
    images = sample_images(2, model.image_size, seed=3)
    got, expected = _nms_case(model, settings, images)
    selected = got["selected_indices"]
    assert selected.dtype == np.int64 and selected.shape[1] == 3
    np.testing.assert_array_equal(selected, expected)
    # The checker the CLI runs (batched) agrees with the slow per-class reference.
    boxes, scores = torch.from_numpy(got["boxes"]), torch.from_numpy(got["scores"])
    np.testing.assert_array_equal(reference_selected_indices(boxes, scores, settings).numpy(), expected)
    # The case exercises what it claims: some class hits the cap, NMS removes candidates, background never shows.
    _, counts = np.unique(selected[:, :2], axis=0, return_counts=True)
    assert counts.max() == settings.max_per_class if cap_binds else counts.min() < settings.max_per_class
    passing = int((scores[..., 1:] > score_threshold).sum())
    assert 0 < len(selected) < min(passing, 2 * len(CLASSES) * top_k)
    assert set(selected[:, 1]) <= {1, 2, 3}


@pytest.mark.parametrize(("top_k", "max_detections"), [(400, 200), (25, 7)])
def test_selected_plus_per_image_cap_equals_postprocess(model, top_k, max_detections):
    """The documented user-side step turns the graph's selection into exactly postprocess's detections
    (checked in PyTorch on one network output, so both sides see bit-identical boxes and scores)."""
    settings = NmsSettings.from_eval(0.2, 0.45, top_k, max_detections)
    images = sample_images(2, model.image_size, seed=4)
    with torch.no_grad():
        out = model(normalize_images(images))
    boxes, scores = _reference(model, images)
    selected = reference_selected_indices(boxes, scores, settings)
    ours = detections_from_selected(boxes.numpy(), scores.numpy(), selected.numpy(), max_detections=max_detections)
    theirs = postprocess(out.loc, out.cls_logits, model.priors(), [[1, 1], [1, 1]], score_threshold=0.2,
                         top_k=top_k, nms_iou=0.45, max_detections=max_detections)  # fmt: skip
    for mine, ref in zip(ours, theirs, strict=True):
        assert len(ref.labels) == max_detections  # the per-image cap is active
        np.testing.assert_array_equal(mine.labels, ref.labels.numpy())
        np.testing.assert_array_equal(mine.scores, ref.scores.numpy())
        np.testing.assert_allclose(mine.boxes, ref.boxes.numpy(), rtol=0, atol=1e-6)


def test_tied_scores_go_to_the_lower_prior_and_the_threshold_is_strict():
    """Zero class heads make every probability exactly 1/4 (exp(0) / 4 in float32, in both runtimes), so
    every top_k cut and every NMS visit is a tie: ONNX TopK and NonMaxSuppression must break ties by the
    lower prior index, as ssd_core does. A threshold of exactly 0.25 keeps nothing (score > threshold)."""
    model = _random_tiny(seed=1)
    with torch.no_grad():
        for head in model.conf:
            head.weight.zero_()
            head.bias.zero_()
    images = sample_images(1, model.image_size, seed=5)
    got, expected = _nms_case(model, NmsSettings.from_eval(0.2499, 0.45, 30, 200), images)
    assert np.all(got["scores"] == 0.25)
    np.testing.assert_array_equal(got["selected_indices"], expected)
    assert set(expected[:, 2]) < set(range(30))  # only the 30 lowest priors were candidates, some suppressed
    got, expected = _nms_case(model, NmsSettings.from_eval(0.25, 0.45, 30, 200), images)
    assert got["selected_indices"].shape == (0, 3) and expected.shape == (0, 3)
    empty = detections_from_selected(got["boxes"], got["scores"], got["selected_indices"], max_detections=5)
    assert [len(d.labels) for d in empty] == [0]


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


def test_cli_exports_with_nms_and_param_overrides(model_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pipeline", "export", "--model", str(model_file), "--out", "out/ssd.onnx",
               "--opset", "16", "--nms", "eval.top_k=50", "eval.max_detections=10"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "export: out/ssd.onnx (5.0 MB, opset 16), max |diff| boxes " in output
    assert "NMS selected" in output and "Warning" not in output
    info = json.loads((tmp_path / "out" / "ssd.onnx.json").read_text())
    assert info["nms"]["top_k"] == 50 and info["nms"]["max_per_class"] == 10
    assert info["verification"]["selected_match"] is True and info["opset"] == 16
    assert [o["name"] for o in info["outputs"]] == ["boxes", "scores", "selected_indices"]


def test_ssd300_exports_at_batch_1(tmp_path):
    """The paper's model (~100 MB of weights): export, check and compare at batch 1 through the library."""
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build_ssd("ssd300_vgg16", 21).eval()
    proto = export_onnx(model, opset=17)
    images = sample_images(1, 300, seed=6)
    got = run_onnx(proto.SerializeToString(), images.numpy())
    boxes, scores = _reference(model, images)
    assert got["scores"].shape == (1, 8732, 21)
    assert np.abs(got["boxes"] - boxes.numpy()).max() <= TOLERANCE.boxes
    assert np.abs(got["scores"] - scores.numpy()).max() <= TOLERANCE.scores
    logging.getLogger(__name__).info("ssd300 export check took %.1f s", time.perf_counter() - started)
