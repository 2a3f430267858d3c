"""SSD training augmentation and evaluation preprocessing on uint8 ``[3, H, W]`` RGB tensors.

``train_transform`` runs the original SSD chain (Caffe SSD / ssd.pytorch ``SSDAugmentation``):

1. photometric distortion (:mod:`ssd_core.photometric`);
2. expansion ("zoom out", probability 1/2): the image is placed at a random integer offset on a canvas
   ``ratio`` times its size, ``ratio ~ U(1, expand_max_ratio)``, filled with the dataset mean colour;
3. min-IoU random crop: one of seven options with equal probability: the whole image, a crop whose IoU
   with at least one box is >= 0.1 / 0.3 / 0.5 / 0.7 / 0.9 (Caffe's ``SatisfySampleConstraint``), or any
   crop; up to 50 trials of side 0.3..1 times the canvas side and aspect ratio h/w in [0.5, 2]; a trial
   must keep at least one box, a box is kept when its centre lies strictly inside the crop, then it is
   clipped to the crop;
4. resize to ``size x size`` (bilinear, ``align_corners=False``, no antialiasing, like the original
   ``cv2.resize``), rounded back to uint8;
5. horizontal flip with probability 1/2.

Edge cases, decided here: when no trial of the chosen crop option succeeds in 50 tries, the image stays
uncropped (the original drew another option, looping forever on some images). An image without boxes
has no IoU or centre constraint: it gets a random crop of the allowed shape (or none) and returns an
empty box set. Boxes that end up degenerate (zero width or height after clipping and float rounding)
are dropped with their labels and difficult flags, so every output box is finite with positive area.

Work is proportional to the image and the output, never to the zoomed-out canvas (up to 16 times the
image): a crop window that reaches the mean-coloured canvas is sampled straight from the image with
``grid_sample`` at the points ``interpolate`` would read (see ``_resize_window``); the 50 crop trials are
evaluated at once.

Randomness comes only from the ``torch.Generator`` argument, in this order: photometric (11 numbers),
expansion (4), crop (1 + 4 x 50), flip (1); a disabled step draws nothing. One seed gives one result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ssd_core.boxes import box_iou, degenerate_box_mask
from ssd_core.photometric import photometric_distort

IMAGE_MEAN = (0.485, 0.456, 0.406)  # RGB on the 0..1 scale (ImageNet), what VGG16 weights expect
IMAGE_STD = (0.229, 0.224, 0.225)
FILL_COLOUR = tuple(255.0 * m for m in IMAGE_MEAN)  # expansion canvas, on the 0..255 scale

# Crop options, drawn with equal probability. None: keep the whole image; a number: the crop must have
# IoU >= it with at least one box; -inf: any crop ("no constraint" in the paper).
CROP_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -math.inf)
CROP_TRIALS = 50  # random crops tried per image before giving up (original)
CROP_MIN_SCALE = 0.3  # smallest crop side / canvas side (original)
CROP_ASPECT_RANGE = (0.5, 2.0)  # allowed crop height / width in pixels (original)


@dataclass(frozen=True)
class AugmentOptions:
    """Which augmentation steps :func:`train_transform` applies.

    Attributes:
        photometric: brightness, contrast, saturation, hue in the original's random order.
        expand: zoom out onto a mean-coloured canvas with probability 1/2.
        expand_max_ratio: largest canvas side / image side (original: 4).
        crop: min-IoU random crop.
        flip: horizontal flip with probability 1/2.
        channel_swap: the original's random channel permutation (off: it changes colour identity).
    """

    photometric: bool = True
    expand: bool = True
    expand_max_ratio: float = 4.0
    crop: bool = True
    flip: bool = True
    channel_swap: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.expand_max_ratio) and self.expand_max_ratio >= 1.0):
            got = self.expand_max_ratio
            raise ValueError(f"AugmentOptions.expand_max_ratio: expected a finite number >= 1, got {got}")


class Sample(NamedTuple):
    """One augmented training sample.

    Attributes:
        image: uint8 ``[3, S, S]``.
        boxes: float32 ``[G', 4]`` xyxy normalised, inside [0, 1] with positive area.
        labels: int64 ``[G']``, aligned with ``boxes``.
        difficult: bool ``[G']``, aligned with ``boxes``.
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    difficult: Tensor


class Expansion(NamedTuple):
    """Where the image sits on the zoom-out canvas (pixels); no expansion is ``(W, H, 0, 0)``."""

    canvas_width: int
    canvas_height: int
    left: int
    top: int


class CropChoice(NamedTuple):
    """Outcome of :func:`sample_crop`.

    Attributes:
        window: ``(x0, y0, x1, y1)`` integer pixels of the canvas, or None for the whole canvas.
        keep: bool ``[G]``, the boxes whose centre is strictly inside the window (all when None).
        min_iou: the option drawn: None (whole image), a number, or -inf (any crop).
    """

    window: tuple[int, int, int, int] | None
    keep: Tensor
    min_iou: float | None


def _check_generator(name: str, generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        got = type(generator).__name__
        raise TypeError(f"{name}: expected a torch.Generator (the only source of randomness), got {got}")
    if generator.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU torch.Generator, got one on {generator.device}")


def sample_expansion(width: int, height: int, max_ratio: float, generator: torch.Generator) -> Expansion:
    """Zoom out with probability 1/2 to a canvas ``int(side * ratio)``, ``ratio ~ U(1, max_ratio)``.

    Draws 4 numbers. The image's top-left corner is uniform over the integer positions that keep it
    inside the canvas.
    """
    coin, r, ux, uy = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    if coin >= 0.5 or max_ratio <= 1.0:
        return Expansion(width, height, 0, 0)
    ratio = 1.0 + (max_ratio - 1.0) * r
    canvas_w, canvas_h = int(width * ratio), int(height * ratio)
    left = min(int(ux * (canvas_w - width + 1)), canvas_w - width)
    top = min(int(uy * (canvas_h - height + 1)), canvas_h - height)
    return Expansion(canvas_w, canvas_h, left, top)


def sample_crop(
    boxes_px: Tensor, width: int, height: int, generator: torch.Generator, *, max_trials: int = CROP_TRIALS
) -> CropChoice:
    """Draw a crop option and up to ``max_trials`` crops at once; take the first that satisfies it.

    Args:
        boxes_px: ``[G, 4]`` xyxy boxes in pixels of the ``width x height`` canvas.
        width, height: canvas size in pixels.
        generator: draws ``1 + 4 * max_trials`` numbers.
        max_trials: crops tried (original: 50).

    Returns:
        :class:`CropChoice`; ``window`` is None for the whole-image option and when no trial succeeds.
    """
    g = boxes_px.shape[0]
    draws = torch.rand(1 + 4 * max_trials, generator=generator, dtype=torch.float64)
    min_iou = CROP_MIN_IOUS[min(int(draws[0] * len(CROP_MIN_IOUS)), len(CROP_MIN_IOUS) - 1)]
    keep_all = torch.ones(g, dtype=torch.bool)
    if min_iou is None:
        return CropChoice(None, keep_all, None)
    u = draws[1:].view(max_trials, 4)
    w = width * (CROP_MIN_SCALE + (1.0 - CROP_MIN_SCALE) * u[:, 0])  # [T]
    h = height * (CROP_MIN_SCALE + (1.0 - CROP_MIN_SCALE) * u[:, 1])  # [T]
    left, top = u[:, 2] * (width - w), u[:, 3] * (height - h)  # [T]
    rects = torch.stack((left, top, left + w, top + h), dim=-1).floor()  # [T, 4] integer pixels
    aspect = h / w
    ok = (aspect >= CROP_ASPECT_RANGE[0]) & (aspect <= CROP_ASPECT_RANGE[1])
    ok &= (rects[:, 2] > rects[:, 0]) & (rects[:, 3] > rects[:, 1])
    inside = torch.zeros(max_trials, g, dtype=torch.bool)
    if g > 0:
        boxes64 = boxes_px.to(torch.float64)
        ok &= box_iou(rects, boxes64).amax(dim=1) >= min_iou
        centres = (boxes64[:, :2] + boxes64[:, 2:]) / 2  # [G, 2]
        inside = ((rects[:, None, :2] < centres) & (centres < rects[:, None, 2:])).all(dim=-1)  # [T, G]
        ok &= inside.any(dim=1)
    hits = ok.nonzero()
    if hits.numel() == 0:
        return CropChoice(None, keep_all, min_iou)
    t = int(hits[0, 0])
    x0, y0, x1, y1 = (int(v) for v in rects[t].tolist())
    return CropChoice((x0, y0, x1, y1), inside[t], min_iou)


def canvas_window(image: Tensor, expansion: Expansion, window: tuple[int, int, int, int] | None = None) -> Tensor:
    """Pixels ``window`` of the expansion canvas (the whole canvas when None), as float32.

    The slow, literal form of what :func:`train_transform` samples (it never builds the canvas).

    Args:
        image: ``[3, H, W]`` image placed at ``(expansion.left, expansion.top)``.
        expansion: the canvas; outside the image it has :data:`FILL_COLOUR`.
        window: ``(x0, y0, x1, y1)`` inside the canvas.

    Returns:
        float32 ``[3, y1 - y0, x1 - x0]``.
    """
    height, width = image.shape[1:]
    x0, y0, x1, y1 = window if window is not None else (0, 0, expansion.canvas_width, expansion.canvas_height)
    left, top = expansion.left, expansion.top
    fill = torch.tensor(FILL_COLOUR, dtype=torch.float32, device=image.device)
    region = fill.view(3, 1, 1).expand(3, y1 - y0, x1 - x0).clone()  # [3, h, w]
    ix0, iy0 = max(x0, left), max(y0, top)  # the image's part of the window
    ix1, iy1 = min(x1, left + width), min(y1, top + height)
    if ix1 > ix0 and iy1 > iy0:
        region[:, iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = image[:, iy0 - top : iy1 - top, ix0 - left : ix1 - left]
    return region


def _resize(image: Tensor, size: int) -> Tensor:
    """float or uint8 ``[3, h, w]`` -> uint8 ``[3, size, size]``, bilinear, rounded to the nearest value."""
    x = image if image.is_floating_point() else image.float()
    if tuple(x.shape[1:]) != (size, size):
        x = F.interpolate(x.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False)[0]
    return x.round().clamp_(0.0, 255.0).to(torch.uint8)


def _source_positions(start: int, length: int, size: int) -> Tensor:
    """Where ``interpolate(bilinear, align_corners=False)`` samples a ``length``-pixel span for ``size`` outputs.

    Pixel ``i`` reads ``(i + 0.5) * length / size - 0.5``, clamped to the span (edge pixels repeat),
    shifted by ``start``. float64 ``[size]``.
    """
    i = torch.arange(size, dtype=torch.float64)
    return ((i + 0.5) * (length / size) - 0.5).clamp(0.0, length - 1.0) + start


def _resize_window(image: Tensor, expansion: Expansion, window: tuple[int, int, int, int], size: int) -> Tensor:
    """``_resize(canvas_window(image, expansion, window), size)`` without building the window.

    A window inside the image is a view, resized as in :func:`eval_transform`. A window that reaches
    the mean-coloured canvas is sampled straight from the image at the same points with ``grid_sample``
    on ``image - fill`` (zero padding then reads as the fill colour), so the cost is ``O(size^2)`` rather
    than the area of a canvas up to 16 times the image.
    """
    height, width = image.shape[1:]
    x0, y0, x1, y1 = window
    left, top = expansion.left, expansion.top
    if x0 >= left and y0 >= top and x1 <= left + width and y1 <= top + height:
        return _resize(image[:, y0 - top : y1 - top, x0 - left : x1 - left], size)
    sx = _source_positions(x0 - left, x1 - x0, size)  # [S] image column of each output column
    sy = _source_positions(y0 - top, y1 - y0, size)  # [S] image row of each output row
    gx = (2.0 * sx + 1.0) / width - 1.0  # grid_sample's normalised coordinates (align_corners=False)
    gy = (2.0 * sy + 1.0) / height - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx.view(1, size), gy.view(size, 1)), dim=-1)  # [S, S, 2] (x, y)
    fill = torch.tensor(FILL_COLOUR, dtype=torch.float32, device=image.device).view(3, 1, 1)
    shifted = (image - fill).unsqueeze(0)  # [1, 3, H, W]; the canvas is 0 outside the image
    out = F.grid_sample(
        shifted, grid.to(shifted).unsqueeze(0), mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]  # [3, S, S]
    return out.add_(fill).round_().clamp_(0.0, 255.0).to(torch.uint8)


def _check_image(name: str, image: Tensor) -> None:
    if not isinstance(image, Tensor) or image.dtype != torch.uint8:
        got = image.dtype if isinstance(image, Tensor) else type(image).__name__
        raise TypeError(f"{name}: expected a uint8 image tensor, got {got}")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"{name}: expected image [3, H, W] (RGB) with H, W >= 1, got {list(image.shape)}")


def _check_size(name: str, size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name}: expected size as a positive int, got {size!r}")


def eval_transform(image: Tensor, size: int) -> Tensor:
    """Resize only: uint8 ``[3, H, W]`` -> uint8 ``[3, size, size]`` (the same resize as training)."""
    _check_image("eval_transform", image)
    _check_size("eval_transform", size)
    return _resize(image, size)


def train_transform(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    difficult: Tensor,
    *,
    size: int,
    options: AugmentOptions,
    generator: torch.Generator,
) -> Sample:
    """The SSD training augmentation (see the module docstring).

    Args:
        image: uint8 ``[3, H, W]`` RGB.
        boxes: float ``[G, 4]`` xyxy normalised to [0, 1].
        labels: int64 ``[G]`` class indices.
        difficult: bool ``[G]`` VOC difficult flags.
        size: output side S.
        options: which steps to apply.
        generator: the only source of randomness (CPU).

    Returns:
        :class:`Sample` with a uint8 ``[3, S, S]`` image and the surviving boxes, labels and flags.
    """
    name = "train_transform"
    _check_image(name, image)
    _check_size(name, size)
    if not isinstance(options, AugmentOptions):
        raise TypeError(f"{name}: expected options as an AugmentOptions, got {type(options).__name__}")
    _check_generator(name, generator)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
        got = f"{boxes.dtype} {list(boxes.shape)}"
        raise ValueError(f"{name}: expected float boxes [G, 4] (xyxy normalised), got {got}")
    g = boxes.shape[0]
    if labels.shape != (g,) or difficult.shape != (g,):
        raise ValueError(
            f"{name}: expected labels [G] and difficult [G] with G = {g} (one per box), "
            f"got {list(labels.shape)} and {list(difficult.shape)}"
        )

    height, width = image.shape[1:]
    x = image
    if options.photometric:
        x = photometric_distort(image.float(), generator, channel_swap=options.channel_swap)  # float [3, H, W]
    expansion = Expansion(width, height, 0, 0)
    if options.expand:
        expansion = sample_expansion(width, height, options.expand_max_ratio, generator)
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    offset = torch.tensor([expansion.left, expansion.top] * 2, dtype=torch.float64)
    boxes_px = boxes.to(torch.float64) * scale + offset  # [G, 4] canvas pixels
    labels, difficult = labels.to(torch.int64), difficult.to(torch.bool)
    window = (0, 0, expansion.canvas_width, expansion.canvas_height)
    if options.crop:
        choice = sample_crop(boxes_px, expansion.canvas_width, expansion.canvas_height, generator)
        if choice.window is not None:
            window = choice.window
            boxes_px, labels, difficult = boxes_px[choice.keep], labels[choice.keep], difficult[choice.keep]

    x0, y0, x1, y1 = window
    origin = torch.tensor([x0, y0, x0, y0], dtype=torch.float64)
    extent = torch.tensor([x1 - x0, y1 - y0] * 2, dtype=torch.float64)
    lower, upper = torch.tensor([x0, y0] * 2, dtype=torch.float64), torch.tensor([x1, y1] * 2, dtype=torch.float64)
    out_boxes = ((boxes_px.clamp(lower, upper) - origin) / extent).to(torch.float32)  # [G', 4] normalised
    out = _resize_window(x, expansion, window, size)  # [3, S, S]

    if options.flip and float(torch.rand((), generator=generator, dtype=torch.float64)) < 0.5:
        out = out.flip(-1)
        out_boxes = torch.stack((1 - out_boxes[:, 2], out_boxes[:, 1], 1 - out_boxes[:, 0], out_boxes[:, 3]), dim=-1)

    out_boxes = out_boxes.clamp(0.0, 1.0)
    good = ~degenerate_box_mask(out_boxes)
    return Sample(out, out_boxes[good], labels[good], difficult[good])


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
