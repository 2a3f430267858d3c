"""Checking an exported SSD graph: onnxruntime against PyTorch, in-graph NMS against ``ssd_core``, and the
sidecar that records what was checked.

``verify_onnx`` runs the graph of ``pipeline.artifacts.onnx_export.export_onnx`` with onnxruntime (CPU) on
seeded random images and compares it with ``ssd_core.deploy.DeployedSSD``: boxes and scores within a
``Tolerance``, and with NMS, ``selected_indices`` equal to ``reference_selected_indices`` (``ssd_core``'s
batched NMS) computed on onnxruntime's own boxes and scores. ``sidecar`` is the ``<out>.json`` that
``python -m pipeline export`` writes beside the model: names, shapes, preprocessing and this check.
Tested with the export, in ``tests/pipeline/artifacts/test_onnx_export.py`` and
``tests/pipeline/stages/test_export.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.artifacts.onnx_export import BATCH_AXIS, BOXES, INPUT_NAME, SCORES, SELECTED, NmsSettings
from ssd_core.deploy import DeployedSSD
from ssd_core.model import SSD
from ssd_core.postprocess import batched_nms

VERIFY_BATCH = 2  # sample images for the check; the graph is traced at batch 1, so this also tests the dynamic axis
VERIFY_SEED = 0


class Tolerance(NamedTuple):
    """Largest accepted max |onnxruntime - PyTorch| per output (boxes are normalised: 1e-4 of 300 px is 0.03 px)."""

    boxes: float = 1e-4
    scores: float = 1e-4


class Verification(NamedTuple):
    """onnxruntime against PyTorch on ``batch_size`` random images."""

    batch_size: int
    max_diff_boxes: float
    max_diff_scores: float
    num_selected: int | None  # rows of selected_indices (None without NMS)
    selected_match: bool | None  # selected_indices == ssd_core NMS on onnxruntime's own boxes and scores

    def within(self, tolerance: Tolerance) -> bool:
        return (
            self.max_diff_boxes <= tolerance.boxes
            and self.max_diff_scores <= tolerance.scores
            and self.selected_match is not False
        )


def run_onnx(model_bytes: bytes, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run the exported model with onnxruntime on CPU; returns every output by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the session's info lines are not for the console
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: images}), strict=True))


def sample_images(batch_size: int, image_size: int, seed: int = VERIFY_SEED) -> Tensor:
    """Uniform random uint8 ``[batch_size, 3, S, S]`` images from a seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=generator, dtype=torch.uint8)


def verify_onnx(
    model_bytes: bytes, model: SSD, nms: NmsSettings | None, *, batch_size: int = VERIFY_BATCH, seed: int = VERIFY_SEED
) -> Verification:
    """Compare onnxruntime with PyTorch (``DeployedSSD``) on random images; with NMS, compare
    ``selected_indices`` with :func:`reference_selected_indices` on onnxruntime's own boxes and scores
    (so the float differences between the two runtimes cannot reorder near-equal scores)."""
    images = sample_images(batch_size, model.image_size, seed)
    with torch.no_grad():
        expected = DeployedSSD(model)(images)
    got = run_onnx(model_bytes, images.numpy())
    diff_boxes = float(np.abs(got[BOXES] - expected.boxes.numpy()).max())
    diff_scores = float(np.abs(got[SCORES] - expected.scores.numpy()).max())
    num_selected = match = None
    if nms is not None:
        selected = got[SELECTED]
        reference = reference_selected_indices(torch.from_numpy(got[BOXES]), torch.from_numpy(got[SCORES]), nms)
        num_selected = int(selected.shape[0])
        match = bool(np.array_equal(selected, reference.numpy()))
    return Verification(batch_size, diff_boxes, diff_scores, num_selected, match)


def reference_selected_indices(boxes: Tensor, scores: Tensor, nms: NmsSettings) -> Tensor:
    """What the graph's ``selected_indices`` must be, computed with ``ssd_core.postprocess.batched_nms``.

    Args:
        boxes: ``[B, P, 4]`` xyxy.
        scores: ``[B, P, C]``, column 0 background.
        nms: the settings the graph was exported with.

    Returns:
        int64 ``[N, 3]`` rows (batch, label, prior) ordered by batch, label, then decreasing score (ties:
        lower prior first): per (image, label) the ``top_k`` best scores, those > ``score_threshold``,
        greedy NMS, the first ``max_per_class``.
    """
    rows = []
    for b in range(boxes.shape[0]):
        fg = scores[b, :, 1:]  # [P, C-1]
        order = torch.sort(fg, dim=0, descending=True, stable=True).indices[: nms.top_k]  # [k, C-1] priors
        prior = order.T.reshape(-1)  # [(C-1) * k] class-major
        label = torch.arange(1, scores.shape[2]).repeat_interleave(order.shape[0])  # [(C-1) * k]
        score = scores[b, prior, label]
        passed = score > nms.score_threshold
        prior, label, score = prior[passed], label[passed], score[passed]
        kept = batched_nms(boxes[b, prior], score, label, nms.iou_threshold)  # by decreasing score
        kept = kept[torch.sort(label[kept], stable=True).indices]  # by label, score order inside
        label_kept = label[kept]
        _, counts = torch.unique_consecutive(label_kept, return_counts=True)
        rank = torch.arange(kept.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        kept = kept[rank < nms.max_per_class]
        rows.append(torch.stack((torch.full_like(kept, b), label[kept], prior[kept]), dim=1))
    return torch.cat(rows) if rows else torch.empty(0, 3, dtype=torch.int64)


def sidecar(
    model: SSD,
    classes: list[str],
    *,
    opset: int,
    nms: NmsSettings | None,
    max_detections: int | None,
    tolerance: Tolerance,
    verification: Verification,
    size_bytes: int,
) -> dict:
    """The ``<out>.json`` description of an exported model: names, shapes, preprocessing and the check."""
    from ssd_core.augment import IMAGE_MEAN, IMAGE_STD

    s, p, c = model.image_size, model.prior_spec.num_priors, model.num_classes
    outputs = [
        {
            "name": BOXES,
            "dtype": "float32",
            "shape": [BATCH_AXIS, p, 4],
            "meaning": "xyxy normalised to [0, 1], decoded with the priors and clipped; multiply by the "
            "original width, height for pixels",
        },
        {
            "name": SCORES,
            "dtype": "float32",
            "shape": [BATCH_AXIS, p, c],
            "meaning": "softmax probabilities; column 0 is background, column c is label c = classes[c - 1]",
        },
    ]
    if nms is not None:
        outputs.append(
            {
                "name": SELECTED,
                "dtype": "int64",
                "shape": ["num_selected", 3],
                "meaning": "rows (batch, label, prior) kept by per-class NMS, by batch, label, decreasing "
                "score; keep the best max_detections per image",
            }
        )
    return {
        "format": "onnx",
        "preset": model.preset,
        "opset": opset,
        "size_bytes": size_bytes,
        "image_size": s,
        "num_priors": p,
        "prior_spec": model.prior_spec.to_dict(),  # the boxes baked into the graph's decoding
        "classes": list(classes),
        "inputs": [
            {
                "name": INPUT_NAME,
                "dtype": "uint8",
                "shape": [BATCH_AXIS, 3, s, s],
                "meaning": f"RGB, NCHW, resized to {s}x{s} (bilinear, as ssd_core.augment.eval_transform); "
                "normalised inside the graph",
            }
        ],
        "outputs": outputs,
        "normalisation": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD), "formula": "(x / 255 - mean) / std"},
        "nms": None
        if nms is None
        else {**nms._asdict(), "max_detections_per_image": max_detections, "per_image_cap": "applied by the caller"},
        "tolerance": tolerance._asdict(),
        "verification": {
            **verification._asdict(),
            "runtime": "onnxruntime CPUExecutionProvider",
            "inputs": f"{verification.batch_size} uniform random uint8 images, seed {VERIFY_SEED}",
        },
    }
