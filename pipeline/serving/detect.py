"""One batch of images through the model and SSD's post-processing: what ``predict`` and the served model share.

``python -m pipeline predict`` (files) and the MLflow pyfunc (encoded bytes or uint8 arrays in a request) both
turn an upright RGB image into the model's input with ``model_input`` and call ``detect`` on a batch, so a
served model returns exactly the detections ``predict`` writes for the same image and settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image


class DetectSettings(NamedTuple):
    """Post-processing settings: ``eval.*`` of the params, then ``min_score`` on what is returned."""

    score_threshold: float  # per-class probability threshold before NMS (eval.score_threshold)
    top_k: int  # candidates per class before NMS (eval.top_k)
    nms_iou: float  # NMS IoU threshold (eval.nms_iou)
    max_detections: int  # kept per image (eval.max_detections)
    min_score: float  # detections scoring below this are left out (predict's --min-score)

    @classmethod
    def from_eval(cls, cfg, min_score: float) -> DetectSettings:
        """From a ``pipeline.config.EvalConfig`` (or anything with its four fields) and ``min_score``."""
        return cls(float(cfg.score_threshold), int(cfg.top_k), float(cfg.nms_iou), int(cfg.max_detections), min_score)


class ImageDetections(NamedTuple):
    """Detections of one image in pixels of the upright original, by decreasing score."""

    boxes: np.ndarray  # float64 [K, 4] xyxy pixels
    scores: np.ndarray  # float64 [K], each >= min_score
    labels: np.ndarray  # int64 [K], 1..C-1


def model_input(image: Image.Image, image_size: int) -> torch.Tensor:
    """The uint8 ``[3, S, S]`` model input of an upright RGB image (``S = image_size``; bilinear resize,
    ``ssd_core.augment.eval_transform``)."""
    from ssd_core.augment import eval_transform

    if image.mode != "RGB":
        raise ValueError(f"model_input: expected an RGB image, got mode {image.mode!r}")
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W, 3], a writable copy
    return eval_transform(pixels.permute(2, 0, 1), image_size)  # [3, S, S]


def detect(
    model: torch.nn.Module,
    images: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    settings: DetectSettings,
) -> list[ImageDetections]:
    """Detections of a batch: one forward pass, ``ssd_core.postprocess.postprocess``, then ``min_score``.

    Args:
        model: an ``ssd_core.model.SSD`` in eval mode.
        images: uint8 ``[B, 3, S, S]`` (``model_input`` of each image), on the model's device.
        sizes: ``[B]`` (width, height) of the upright originals, for boxes in their pixels.
        settings: the post-processing thresholds.
    """
    from ssd_core.augment import normalize_images
    from ssd_core.postprocess import postprocess

    if images.ndim != 4 or images.dtype != torch.uint8 or len(sizes) != images.shape[0]:
        raise ValueError(
            f"detect: expected uint8 images [B, 3, S, S] and B sizes, got {images.dtype} {list(images.shape)} "
            f"and {len(sizes)} sizes"
        )
    priors = model.priors().to(images.device)  # [P, 4] cxcywh
    with torch.inference_mode():
        output = model(normalize_images(images))
        found = postprocess(
            output.loc,
            output.cls_logits,
            priors,
            list(sizes),
            score_threshold=settings.score_threshold,
            top_k=settings.top_k,
            nms_iou=settings.nms_iou,
            max_detections=settings.max_detections,
        )
    results = []
    for det in found:
        scores = det.scores.float().cpu().numpy().astype(np.float64)  # [K]
        keep = scores >= settings.min_score
        results.append(
            ImageDetections(
                det.boxes.float().cpu().numpy().astype(np.float64).reshape(-1, 4)[keep],  # [K', 4]
                scores[keep],
                det.labels.cpu().numpy().astype(np.int64)[keep],
            )
        )
    return results
