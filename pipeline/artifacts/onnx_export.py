"""ONNX export of a trained SSD with its box decoding and optional in-graph NMS, and how to read its output.

``pipeline.artifacts.onnx_verify`` checks an exported graph with onnxruntime against PyTorch.

The graph (see ``ssd_core.deploy.DeployedSSD``)::

    images            uint8   [B, 3, S, S]  RGB, already resized to the model's side S (B is dynamic)
    -> boxes          float32 [B, P, 4]     xyxy normalised to [0, 1] (decoded with the priors, clipped)
    -> scores         float32 [B, P, C]     softmax probabilities; column 0 is background, column c is
                                            label c, i.e. class name ``classes[c - 1]``
    -> selected_indices int64 [N, 3]        only with NMS: rows (batch, label, prior), label in 1..C-1,
                                            ordered by batch, label, then decreasing score

Without NMS, suppression is the caller's job (``ssd_core.postprocess`` semantics: per class, scores above
the threshold, the ``top_k`` best, greedy NMS, then the best ``max_detections`` per image).

With NMS the graph ends in ONNX ``NonMaxSuppression`` run per (image, foreground class) on ``boxes`` and
``nms_candidate_scores`` (scores outside each class's ``top_k`` zeroed, so the pre-selection is
``postprocess``'s), with ``score_threshold`` and ``nms_iou`` from ``params.eval`` and
``max_output_boxes_per_class = min(top_k, max_detections)``. What the graph cannot do is the per-image
cap: ONNX NMS limits boxes per class, not per image. Taking the best ``max_detections`` rows per image
(:func:`detections_from_selected`) gives exactly ``postprocess``'s detections; the per-class cap changes
nothing there, since no class can place more than ``max_detections`` boxes among an image's best
``max_detections``. Box corners are passed as (x1, y1, x2, y2) where the operator's ``center_point_box=0``
layout names (y1, x1, y2, x2): IoU is symmetric in x and y, so the result is the same.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``; the dynamo exporter needs
``onnxscript``, which this project does not install. It supports opsets up to 20; 11 is the lowest
accepted here (ONNX ``TopK`` defines its tie order from 11 on; ``NonMaxSuppression`` needs 10).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from ssd_core.deploy import DeployedSSD, nms_candidate_scores
from ssd_core.model import SSD

logger = logging.getLogger(__name__)

MIN_OPSET = 11  # ONNX TopK's tie order (lower index first) is defined from opset 11
MAX_OPSET = 20  # the newest opset the TorchScript exporter of torch 2.13 writes
INPUT_NAME = "images"
BOXES = "boxes"
SCORES = "scores"
SELECTED = "selected_indices"
_CANDIDATES = "nms_candidate_scores"  # internal output of the traced graph, consumed by the NMS node
BATCH_AXIS = "batch"


class NmsSettings(NamedTuple):
    """In-graph NMS settings (the ``params.eval`` values)."""

    score_threshold: float  # keep scores > this (>= 0)
    iou_threshold: float  # suppress IoU > this
    top_k: int  # candidates per image and class before NMS
    max_per_class: int  # boxes kept per image and class: min(top_k, max_detections)

    @classmethod
    def from_eval(cls, score_threshold: float, nms_iou: float, top_k: int, max_detections: int) -> NmsSettings:
        return cls(float(score_threshold), float(nms_iou), int(top_k), int(min(top_k, max_detections)))


class SelectedDetections(NamedTuple):
    """Detections of one image from the graph's outputs, by decreasing score (see detections_from_selected)."""

    boxes: np.ndarray  # float32 [K, 4] xyxy normalised
    scores: np.ndarray  # float32 [K]
    labels: np.ndarray  # int64 [K] in 1..C-1
    priors: np.ndarray  # int64 [K] prior index of each detection


class _ExportGraph(nn.Module):
    """DeployedSSD, plus the NMS candidate scores as a third output when ``top_k`` is given."""

    def __init__(self, deployed: DeployedSSD, top_k: int | None) -> None:
        super().__init__()
        self.deployed = deployed
        self.top_k = top_k
        # torch.onnx.export switches the graph to eval and back to this mode, recursively: eval, as the
        # model already is, so that exporting leaves the caller's model untouched.
        self.training = False

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        boxes, scores = self.deployed(images)  # [B, P, 4], [B, P, C]
        if self.top_k is None:
            return boxes, scores
        return boxes, scores, nms_candidate_scores(scores, self.top_k)  # ..., [B, C-1, P]


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"ONNX export: expected an opset in {MIN_OPSET}..{MAX_OPSET}, got {opset!r}")
    return opset


def export_onnx(
    model: SSD, *, opset: int = 17, nms: NmsSettings | None = None, metadata: Mapping[str, str] | None = None
) -> onnx.ModelProto:
    """Trace ``model`` with its decoding (and NMS when ``nms`` is given) into a checked ONNX model.

    Args:
        model: a trained SSD in eval mode (batch norm running statistics).
        opset: ONNX opset, ``MIN_OPSET..MAX_OPSET``.
        nms: append ``NonMaxSuppression`` with these settings; None leaves NMS to the caller.
        metadata: string key/values stored in the model's ``metadata_props``.

    Returns:
        The model, passed by ``onnx.checker.check_model(full_check=True)``.
    """
    check_opset(opset)
    if not isinstance(model, SSD):
        raise TypeError(f"export_onnx: expected an ssd_core.model.SSD, got {type(model).__name__}")
    if model.training:
        raise ValueError("export_onnx: expected the model in eval mode (batch norm running statistics); call .eval()")
    if nms is not None:
        _check_nms(nms)
    deployed = DeployedSSD(model)
    top_k = None if nms is None else min(nms.top_k, model.prior_spec.num_priors)
    graph = _ExportGraph(deployed, top_k)
    outputs = [BOXES, SCORES] + ([] if nms is None else [_CANDIDATES])
    example = torch.zeros(1, 3, model.image_size, model.image_size, dtype=torch.uint8)
    with tempfile.TemporaryDirectory(prefix="ssd-onnx-") as folder, torch.no_grad(), warnings.catch_warnings():
        _ignore_understood_export_warnings()
        path = Path(folder) / "graph.onnx"
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes={name: {0: BATCH_AXIS} for name in [INPUT_NAME, *outputs]},
        )
        proto = onnx.load(str(path))
    if nms is not None:
        _append_nms(proto, nms)
    proto.doc_string = _doc(model, nms)
    if metadata:
        helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _check_nms(nms: NmsSettings) -> None:
    if not (0.0 <= nms.score_threshold < 1.0 and 0.0 <= nms.iou_threshold <= 1.0):
        raise ValueError(f"export_onnx: expected 0 <= score_threshold < 1 and 0 <= iou_threshold <= 1, got {nms}")
    if nms.top_k < 1 or nms.max_per_class < 1:
        raise ValueError(f"export_onnx: expected top_k >= 1 and max_per_class >= 1, got {nms}")


def _ignore_understood_export_warnings() -> None:
    """Silence the warnings every export of this graph raises, and only those (inside catch_warnings).

    - The TorchScript exporter announces its own deprecation (``dynamo=False`` is deliberate, see the module
      docstring) and warns about an internal context manager it still uses.
    - Tracing turns the shape checks of ``ssd_core`` (channels, S, 4 box coordinates, C >= 2) into
      constants; they test only static dimensions, which the exported graph fixes anyway, never the
      dynamic batch axis.
    """
    warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
    warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning, r"torch\.onnx\.")
    warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning, r"ssd_core\.")


def _append_nms(proto: onnx.ModelProto, nms: NmsSettings) -> None:
    """Replace the candidate-score output by ``NonMaxSuppression`` on (boxes, candidates) -> ``selected_indices``."""
    graph = proto.graph
    constants = {
        "nms_max_output_boxes_per_class": np.array(nms.max_per_class, dtype=np.int64),  # scalar
        "nms_iou_threshold": np.array(nms.iou_threshold, dtype=np.float32),
        "nms_score_threshold": np.array(nms.score_threshold, dtype=np.float32),
        # NMS numbers the classes of its scores input, foreground only (0 = label 1): shift to labels.
        "nms_label_offset": np.array([[0, 1, 0]], dtype=np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    nms_inputs = [BOXES, _CANDIDATES, *list(constants)[:3]]
    suppress = helper.make_node(
        "NonMaxSuppression", nms_inputs, ["nms_selected_foreground"], name="nms", center_point_box=0
    )
    relabel = helper.make_node("Add", ["nms_selected_foreground", "nms_label_offset"], [SELECTED], name="nms_labels")
    graph.node.extend([suppress, relabel])
    kept = [out for out in graph.output if out.name != _CANDIDATES]
    del graph.output[:]
    graph.output.extend(kept)
    graph.output.append(helper.make_tensor_value_info(SELECTED, TensorProto.INT64, ["num_selected", 3]))


def _doc(model: SSD, nms: NmsSettings | None) -> str:
    s, p, c = model.image_size, model.prior_spec.num_priors, model.num_classes
    text = (
        f"SSD ({model.preset}). Input {INPUT_NAME}: uint8 [batch, 3, {s}, {s}] RGB resized to {s}x{s}; "
        f"normalisation is inside the graph. Outputs {BOXES}: float32 [batch, {p}, 4] xyxy normalised to [0, 1]; "
        f"{SCORES}: float32 [batch, {p}, {c}] softmax, column 0 = background."
    )
    if nms is not None:
        text += (
            f" {SELECTED}: int64 [N, 3] (batch, label 1..{c - 1}, prior) after per-class NMS "
            f"(score > {nms.score_threshold}, top {nms.top_k} per class, IoU > {nms.iou_threshold} suppressed, "
            f"at most {nms.max_per_class} per class); keep the best max_detections per image yourself."
        )
    return text


def detections_from_selected(
    boxes: np.ndarray, scores: np.ndarray, selected_indices: np.ndarray, *, max_detections: int
) -> list[SelectedDetections]:
    """The user-side end of the NMS graph: the best ``max_detections`` selected boxes of each image.

    With the graph's outputs this equals ``ssd_core.postprocess.postprocess`` on the same network output
    (normalised boxes, i.e. image sizes 1 x 1): ties in score go to the lower label, then to the earlier row.

    Args:
        boxes: ``[B, P, 4]``; scores: ``[B, P, C]``; selected_indices: int64 ``[N, 3]`` (batch, label, prior).
    """
    batch, label, prior = (selected_indices[:, i].astype(np.int64) for i in range(3))
    picked = scores[batch, prior, label]  # [N]
    result = []
    for b in range(boxes.shape[0]):
        rows = np.flatnonzero(batch == b)  # in graph order: label, then decreasing score
        rows = rows[np.argsort(-picked[rows], kind="stable")[:max_detections]]
        result.append(SelectedDetections(boxes[b, prior[rows]], picked[rows], label[rows], prior[rows]))
    return result


def metadata(model: SSD, classes: list[str]) -> dict[str, str]:
    """``metadata_props`` of the exported model: enough to use it without the sidecar."""
    from ssd_core.augment import IMAGE_MEAN, IMAGE_STD

    return {
        "preset": model.preset,
        "image_size": str(model.image_size),
        "prior_spec": json.dumps(model.prior_spec.to_dict()),  # the boxes baked into the graph's decoding
        "classes": json.dumps(list(classes)),
        "score_columns": "0 = background, c = classes[c - 1]",
        "mean": json.dumps(list(IMAGE_MEAN)),
        "std": json.dumps(list(IMAGE_STD)),
    }
