"""Model input normalisation: uint8 RGB images to the float32 inputs the ImageNet-pretrained VGG16 expects."""

from __future__ import annotations

import torch
from torch import Tensor

IMAGE_MEAN = (0.485, 0.456, 0.406)  # RGB on the 0..1 scale (ImageNet), what VGG16 weights expect
IMAGE_STD = (0.229, 0.224, 0.225)


def normalize_images(images: Tensor) -> Tensor:
    """uint8 ``[B, 3, H, W]`` (any device, any memory format) -> float32 ``(x / 255 - mean) / std``.

    Computed as one fused ``x * (1 / (255 std)) - mean / std`` (``torch.addcmul``).
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"normalize_images: expected uint8 images, got {got}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize_images: expected images [B, 3, H, W], got {list(images.shape)}")
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float64)
    std = torch.tensor(IMAGE_STD, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).to(device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    shift = (-mean / std).to(device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
    return torch.addcmul(shift, images.to(torch.float32), scale)
