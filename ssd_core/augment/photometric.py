"""SSD photometric distortion on float images in [0, 255] (the first step of :mod:`ssd_core.augment`).

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

Drawing and applying are separate (:func:`sample_photometric`, :func:`apply_photometric`): every step is a
function of one pixel's own value, so :mod:`ssd_core.augment` draws the parameters first (in the plan) and
applies them only to the source pixels its output reads. :func:`photometric_distort` does both on a whole image.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

BRIGHTNESS_DELTA = 32.0  # added value drawn from U(-32, 32), on the 0..255 scale (original)
CONTRAST_RANGE = (0.5, 1.5)  # multiplier (original)
SATURATION_RANGE = (0.5, 1.5)  # chroma multiplier (original, there on HSV saturation)
HUE_DELTA_DEGREES = 18.0  # rotation drawn from U(-18, 18) degrees (original, there on the HSV hue)
CHANNEL_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))  # original's list
PHOTOMETRIC_DRAWS = 11  # uniform numbers one call draws, whatever it applies

# RGB -> YIQ (NTSC 1953 coefficients). Luma row = the ITU-R 601 weights of the greyscale transform.
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]],
    dtype=np.float64,
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


class PhotometricParams(NamedTuple):
    """One draw of :func:`sample_photometric`; a step that was not drawn is None.

    Attributes:
        brightness: value added to every channel (0..255 scale).
        contrast: multiplier.
        contrast_first: contrast before (True) or after (False) the saturation + hue block.
        colour: float32 ``[3, 3]`` RGB -> RGB matrix of the saturation + hue block (:func:`colour_matrix`).
        channel_order: the channel permutation, e.g. ``(2, 0, 1)``.
    """

    brightness: float | None
    contrast: float | None
    contrast_first: bool
    colour: Tensor | None
    channel_order: tuple[int, int, int] | None

    @property
    def is_identity(self) -> bool:
        """True when no step was drawn: the image passes unchanged."""
        return self.brightness is None and self.contrast is None and self.colour is None and self.channel_order is None


def colour_matrix(saturation: float, hue_degrees: float) -> Tensor:
    """float32 ``[3, 3]`` RGB -> RGB matrix: scale chroma by ``saturation`` and rotate hue by ``hue_degrees``.

    ``M = YIQ_to_RGB @ [[1, 0, 0], [0, s cos t, -s sin t], [0, s sin t, s cos t]] @ RGB_to_YIQ``; it leaves
    the luma Y of every pixel unchanged and maps grey (R = G = B) to itself.
    """
    t = math.radians(hue_degrees)
    cos, sin = math.cos(t) * saturation, math.sin(t) * saturation
    chroma = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]], dtype=np.float64)
    return torch.from_numpy((_YIQ_TO_RGB @ chroma @ _RGB_TO_YIQ).astype(np.float32))  # NumPy: cheap for 3 x 3


def _uniform(u: float, low: float, high: float) -> float:
    return low + (high - low) * u


def sample_photometric(generator: torch.Generator, *, channel_swap: bool = False) -> PhotometricParams:
    """Draw the photometric steps: :data:`PHOTOMETRIC_DRAWS` uniform numbers from ``generator``, always.

    Each of brightness, contrast, the saturation + hue block (saturation and hue each on with probability
    1/2) and, when ``channel_swap``, the channel permutation is applied with probability 1/2.
    """
    draws = torch.rand(PHOTOMETRIC_DRAWS, generator=generator, dtype=torch.float64).tolist()
    return photometric_from_uniforms(draws, channel_swap=channel_swap)


def photometric_from_uniforms(draws: list[float], *, channel_swap: bool = False) -> PhotometricParams:
    """The steps that :func:`sample_photometric` draws, from its :data:`PHOTOMETRIC_DRAWS` uniform numbers."""
    if len(draws) != PHOTOMETRIC_DRAWS:
        raise ValueError(f"photometric_from_uniforms: expected {PHOTOMETRIC_DRAWS} numbers, got {len(draws)}")
    bright_on, bright, contrast_first, contrast_on, contrast, sat_on, sat, hue_on, hue, swap_on, swap = draws
    brightness = _uniform(bright, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA) if bright_on < 0.5 else None
    alpha = _uniform(contrast, *CONTRAST_RANGE) if contrast_on < 0.5 else None
    colour = None
    if sat_on < 0.5 or hue_on < 0.5:
        saturation = _uniform(sat, *SATURATION_RANGE) if sat_on < 0.5 else 1.0
        hue_degrees = _uniform(hue, -HUE_DELTA_DEGREES, HUE_DELTA_DEGREES) if hue_on < 0.5 else 0.0
        colour = colour_matrix(saturation, hue_degrees)
    order = None
    if channel_swap and swap_on < 0.5:
        order = CHANNEL_PERMUTATIONS[min(int(swap * len(CHANNEL_PERMUTATIONS)), len(CHANNEL_PERMUTATIONS) - 1)]
    return PhotometricParams(brightness, alpha, contrast_first < 0.5, colour, order)


def apply_photometric(image: Tensor, params: PhotometricParams) -> Tensor:
    """Apply drawn steps to ``image``: brightness, contrast (first), colour matrix, contrast (after), swap.

    Every step maps one pixel's value to a new value of the same pixel (clamped to [0, 255] after each),
    so it may be applied to any subset of an image's pixels with the same result there.

    Args:
        image: ``[3, H, W]`` RGB on the 0..255 scale, uint8 or float, any memory layout. Not modified.
        params: from :func:`sample_photometric`.

    Returns:
        A new float32 ``[3, H, W]`` contiguous tensor in [0, 255].
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"apply_photometric: expected an image [3, H, W], got {list(image.shape)}")
    x = torch.empty(image.shape, dtype=torch.float32, device=image.device)  # [3, H, W] contiguous
    if params.brightness is not None:
        torch.add(image, params.brightness, out=x).clamp_(0.0, 255.0)  # conversion, layout and the step in one pass
    else:
        x.copy_(image)
    if params.contrast is not None and params.contrast_first:
        x.mul_(params.contrast).clamp_(0.0, 255.0)
    if params.colour is not None:
        matrix = params.colour
        if params.channel_order is not None:  # a permutation commutes with the clamps and the contrast after it
            matrix = matrix[list(params.channel_order)]
        x = torch.mm(matrix.to(x.device), x.view(3, -1)).view_as(x).clamp_(0.0, 255.0)  # [3, H*W] -> [3, H, W]
    elif params.channel_order is not None:
        x = x[list(params.channel_order)]
    if params.contrast is not None and not params.contrast_first:
        x.mul_(params.contrast).clamp_(0.0, 255.0)
    return x


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
    return apply_photometric(image, sample_photometric(generator, channel_swap=channel_swap))
