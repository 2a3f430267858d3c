"""SSD photometric distortion on float images in [0, 255] (part of :mod:`ssd_core.transforms`).

The original (Caffe SSD, ssd.pytorch ``PhotometricDistort``): random brightness, then contrast either
before or after a saturation + hue block, then an optional random channel swap; each step applied with
probability 1/2. Differences, all deliberate:

- Hue and saturation act in YIQ, not HSV. Saturation scales the chroma (I, Q) around the luma Y =
  0.299 R + 0.587 G + 0.114 B, which is exactly a blend with the greyscale image (torchvision's
  ``adjust_saturation``); hue rotates the (I, Q) plane by the sampled angle, a close approximation of
  an HSV hue shift. Both are linear in RGB, so the whole block is one 3x3 matrix: one vectorised pass,
  no per-pixel branching and no RGB<->HSV round trip (which costs ~10 passes).
- Values are clamped to [0, 255] after each step, as torchvision's colour transforms do; the original
  let them drift outside the range between steps.
- The channel swap (the original's ``RandomLightingNoise``) is off by default: it changes an object's
  colour identity, and most later SSD ports drop it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BRIGHTNESS_DELTA = 32.0  # added value drawn from U(-32, 32), on the 0..255 scale (original)
CONTRAST_RANGE = (0.5, 1.5)  # multiplier (original)
SATURATION_RANGE = (0.5, 1.5)  # chroma multiplier (original, there on HSV saturation)
HUE_DELTA_DEGREES = 18.0  # rotation drawn from U(-18, 18) degrees (original, there on the HSV hue)
CHANNEL_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))  # original's list
PHOTOMETRIC_DRAWS = 11  # uniform numbers one call draws, whatever it applies

# RGB -> YIQ (NTSC 1953 coefficients). Luma row = the ITU-R 601 weights of the greyscale transform.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=torch.float64,
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def colour_matrix(saturation: float, hue_degrees: float) -> Tensor:
    """float32 ``[3, 3]`` RGB -> RGB matrix: scale chroma by ``saturation`` and rotate hue by ``hue_degrees``.

    ``M = YIQ_to_RGB @ [[1, 0, 0], [0, s cos t, -s sin t], [0, s sin t, s cos t]] @ RGB_to_YIQ``; it leaves
    the luma Y of every pixel unchanged and maps grey (R = G = B) to itself.
    """
    t = math.radians(hue_degrees)
    cos, sin = math.cos(t) * saturation, math.sin(t) * saturation
    chroma = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], dtype=torch.float64)
    return (_YIQ_TO_RGB @ chroma @ _RGB_TO_YIQ).to(torch.float32)


def _uniform(u: float, low: float, high: float) -> float:
    return low + (high - low) * u


def photometric_distort(image: Tensor, generator: torch.Generator, *, channel_swap: bool = False) -> Tensor:
    """Random brightness, contrast, saturation and hue (and optionally a channel swap).

    Args:
        image: float ``[3, H, W]`` RGB on the 0..255 scale. Not modified.
        generator: the only source of randomness; draws :data:`PHOTOMETRIC_DRAWS` numbers per call.
        channel_swap: also apply the original's random channel permutation with probability 1/2.

    Returns:
        float32 ``[3, H, W]`` in [0, 255].
    """
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        got = f"{image.dtype} {list(image.shape)}"
        raise ValueError(f"photometric_distort: expected a float [3, H, W] image, got {got}")
    u = torch.rand(PHOTOMETRIC_DRAWS, generator=generator, dtype=torch.float64).tolist()
    bright_on, bright, contrast_first, contrast_on, contrast, sat_on, sat, hue_on, hue, swap_on, swap = u
    x = image.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if bright_on < 0.5:
        x.add_(_uniform(bright, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA)).clamp_(0.0, 255.0)
    alpha = _uniform(contrast, *CONTRAST_RANGE) if contrast_on < 0.5 else None
    if alpha is not None and contrast_first < 0.5:
        x.mul_(alpha).clamp_(0.0, 255.0)
    saturation = _uniform(sat, *SATURATION_RANGE) if sat_on < 0.5 else 1.0
    hue_degrees = _uniform(hue, -HUE_DELTA_DEGREES, HUE_DELTA_DEGREES) if hue_on < 0.5 else 0.0
    if sat_on < 0.5 or hue_on < 0.5:
        matrix = colour_matrix(saturation, hue_degrees).to(x.device)
        x = torch.mm(matrix, x.view(3, -1)).view_as(x).clamp_(0.0, 255.0)  # [3, H*W] -> [3, H, W]
    if alpha is not None and contrast_first >= 0.5:
        x.mul_(alpha).clamp_(0.0, 255.0)
    if channel_swap and swap_on < 0.5:
        perm = CHANNEL_PERMUTATIONS[min(int(swap * len(CHANNEL_PERMUTATIONS)), len(CHANNEL_PERMUTATIONS) - 1)]
        x = x[list(perm)]
    return x
