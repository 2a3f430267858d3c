"""The SSD as one inference graph: uint8 images in, decoded boxes and class probabilities out.

:class:`DeployedSSD` wraps a trained :class:`ssd_core.model.SSD` so that everything between the image
tensor and non-maximum suppression runs inside the module, which is what an exported graph (ONNX,
TorchScript) needs to be usable without this package:

1. normalisation ``(x / 255 - mean) / std`` with the training mean and std, computed exactly as
   :func:`ssd_core.augment.normalize_images` (same fused ``addcmul``, same float32 constants);
2. the network;
3. box decoding with the model's priors (a constant of the graph) and variances, clipped to [0, 1]
   (as :func:`ssd_core.postprocess.postprocess` clips before NMS);
4. softmax over all C classes, background (column 0) included, so each row sums to 1.

:func:`nms_candidate_scores` prepares the scores for a per-class NMS operator (ONNX
``NonMaxSuppression``): foreground classes only, class-major, and every score outside its class's
``top_k`` set to 0, which reproduces ``postprocess``'s top-k pre-selection.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ssd_core.augment.normalize import IMAGE_MEAN, IMAGE_STD
from ssd_core.coding import DEFAULT_VARIANCES, decode_boxes
from ssd_core.model import SSD


class DeployOutput(NamedTuple):
    """What :class:`DeployedSSD` returns, in prior order."""

    boxes: Tensor  # [B, P, 4] float32 xyxy normalised, clipped to [0, 1]
    scores: Tensor  # [B, P, C] float32 softmax probabilities, column 0 = background


class DeployedSSD(nn.Module):
    """``uint8 [B, 3, S, S] RGB -> DeployOutput(boxes [B, P, 4], scores [B, P, C])`` for a trained SSD.

    Args:
        model: the network, in eval mode (its batch norm must use running statistics). It is held, not
            copied; ``S = model.image_size``. Resizing to ``S x S`` is the caller's job
            (``ssd_core.augment.eval_transform``: bilinear, no antialiasing, rounded to uint8).
        variances: the box coding variances the model was trained with.
    """

    def __init__(self, model: SSD, variances: tuple[float, float] = DEFAULT_VARIANCES) -> None:
        super().__init__()
        if not isinstance(model, SSD):
            raise TypeError(f"DeployedSSD: expected an ssd_core.model.SSD, got {type(model).__name__}")
        self.model = model
        self.training = model.training  # follow the model's mode; .train()/.eval() would change the model
        self.image_size = model.image_size
        self.num_classes = model.num_classes
        self.variances = (float(variances[0]), float(variances[1]))
        # The constants of normalize_images: computed in float64, rounded once to float32.
        mean = torch.tensor(IMAGE_MEAN, dtype=torch.float64)
        std = torch.tensor(IMAGE_STD, dtype=torch.float64)
        self.register_buffer("scale", (1.0 / (255.0 * std)).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).float().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("priors", model.priors(), persistent=False)  # [P, 4] cxcywh

    def forward(self, images: Tensor) -> DeployOutput:
        """Boxes and class probabilities of every prior for ``images`` uint8 ``[B, 3, S, S]`` RGB."""
        if images.dtype != torch.uint8:
            raise TypeError(f"DeployedSSD: expected uint8 images [B, 3, S, S] (0..255 RGB), got {images.dtype}")
        x = torch.addcmul(self.shift, images.to(torch.float32), self.scale)  # [B, 3, S, S] normalised
        out = self.model(x)  # loc [B, P, 4], cls_logits [B, P, C]
        boxes = decode_boxes(out.loc, self.priors, self.variances).clamp(0.0, 1.0)  # [B, P, 4]
        scores = torch.softmax(out.cls_logits, dim=-1)  # [B, P, C]
        return DeployOutput(boxes, scores)


def nms_candidate_scores(scores: Tensor, top_k: int) -> Tensor:
    """Foreground scores laid out for a per-class NMS operator, outside each class's top ``top_k`` set to 0.

    Args:
        scores: ``[B, P, C]`` class probabilities, column 0 background.
        top_k: candidates per image and class (``postprocess``'s ``top_k``); ``>= P`` keeps all.

    Returns:
        ``[B, C - 1, P]``: entry ``[b, c - 1, p]`` is ``scores[b, p, c]`` if it is among the ``top_k``
        largest of class ``c`` in image ``b``, else 0 (so a score threshold ``>= 0`` drops it). Ties at the
        ``top_k`` boundary go to the lower prior index in ONNX ``TopK`` (opset >= 11 defines it); eager
        ``torch.topk`` does not promise an order for ties.
    """
    if scores.ndim != 3 or scores.shape[2] < 2:
        raise ValueError(f"nms_candidate_scores: expected scores [B, P, C >= 2], got {list(scores.shape)}")
    if top_k < 1:
        raise ValueError(f"nms_candidate_scores: expected top_k >= 1, got {top_k}")
    foreground = scores[:, :, 1:].transpose(1, 2)  # [B, C-1, P]
    num_priors = scores.shape[1]
    if top_k >= num_priors:
        return foreground.contiguous()
    best = torch.topk(foreground, top_k, dim=-1)  # [B, C-1, k] values and indices
    return torch.zeros_like(foreground).scatter(-1, best.indices, best.values)  # [B, C-1, P]
