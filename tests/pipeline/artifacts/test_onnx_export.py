"""ONNX export of a model: onnxruntime against an independent PyTorch computation, in-graph NMS against ssd_core.

The model is ssd_tiny (160 x 160 input, P = 2390 priors) with random weights, its batch norm running
statistics and heads randomised so that eval mode matters and scores and boxes are spread out
(``tests.pipeline.fixtures.random_tiny_ssd``); one test exports the paper's SSD300.

The checker the export command runs (``pipeline.artifacts.onnx_verify``) is tested here too: its batched
``reference_selected_indices`` against a slow per-class reference; ``verify_onnx`` and ``sidecar`` through
the command in ``tests/pipeline/stages/test_export.py``.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import torch

from pipeline.artifacts.onnx_export import NmsSettings, detections_from_selected, export_onnx, metadata
from pipeline.artifacts.onnx_verify import Tolerance, reference_selected_indices, run_onnx, sample_images
from ssd_core.augment import normalize_images
from ssd_core.model import build_ssd
from ssd_core.postprocess import nms, postprocess
from ssd_core.priors import SSD300_COCO, PriorSpec
from tests.pipeline.fixtures import random_tiny_ssd, reference_boxes_scores

CLASSES = ["circle", "square", "triangle"]
TOLERANCE = Tolerance()  # the stated tolerance: 1e-4 on normalised boxes and on probabilities


@pytest.fixture(scope="module")
def model():
    return random_tiny_ssd(len(CLASSES) + 1)


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
def test_nms_graph_selects_what_ssd_core_nms_selects(model, score_threshold, iou, top_k, max_detections, cap_binds):
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
    boxes, scores = reference_boxes_scores(model, images)
    selected = reference_selected_indices(boxes, scores, settings)
    ours = detections_from_selected(boxes.numpy(), scores.numpy(), selected.numpy(), max_detections=max_detections)
    theirs = postprocess(
        out.loc,
        out.cls_logits,
        model.priors(),
        [[1, 1], [1, 1]],
        score_threshold=0.2,
        top_k=top_k,
        nms_iou=0.45,
        max_detections=max_detections,
    )
    for mine, ref in zip(ours, theirs, strict=True):
        assert len(ref.labels) == max_detections  # the per-image cap is active
        np.testing.assert_array_equal(mine.labels, ref.labels.numpy())
        np.testing.assert_array_equal(mine.scores, ref.scores.numpy())
        np.testing.assert_allclose(mine.boxes, ref.boxes.numpy(), rtol=0, atol=1e-6)


def test_tied_scores_go_to_the_lower_prior_and_the_threshold_is_strict():
    """Zero class heads make every probability exactly 1/4 (exp(0) / 4 in float32, in both runtimes), so
    every top_k cut and every NMS visit is a tie: ONNX TopK and NonMaxSuppression must break ties by the
    lower prior index, as ssd_core does. A threshold of exactly 0.25 keeps nothing (score > threshold)."""
    model = random_tiny_ssd(len(CLASSES) + 1, seed=1)
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


@pytest.mark.slow
def test_ssd300_exports_at_batch_1(tmp_path):
    """The paper's model (~100 MB of weights): export, check and compare at batch 1 through the library."""
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build_ssd("ssd300_vgg16", 21).eval()
    proto = export_onnx(model, opset=17)
    images = sample_images(1, 300, seed=6)
    got = run_onnx(proto.SerializeToString(), images.numpy())
    boxes, scores = reference_boxes_scores(model, images)
    assert got["scores"].shape == (1, 8732, 21)
    assert np.abs(got["boxes"] - boxes.numpy()).max() <= TOLERANCE.boxes
    assert np.abs(got["scores"] - scores.numpy()).max() <= TOLERANCE.scores
    logging.getLogger(__name__).info("ssd300 export check took %.1f s", time.perf_counter() - started)


def test_the_metadata_records_the_models_full_prior_spec():
    """Not the preset's name: a COCO-box SSD300 says so, to the last size."""
    with torch.device("meta"):
        model = build_ssd("ssd300_vgg16", 3, prior_spec=SSD300_COCO)
    recorded = PriorSpec.from_dict(json.loads(metadata(model, ["a", "b"])["prior_spec"]))
    assert recorded == SSD300_COCO and recorded.min_sizes[0] == 21
