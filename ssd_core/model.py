"""The SSD network: a VGG-style base, extra layers and multi-scale 3x3 prediction heads.

``build_ssd(preset, num_classes)`` builds one of ``PRESETS``:

- ``ssd300_vgg16`` / ``ssd512_vgg16``: the paper's models (Liu et al. 2016, and the released Caffe
  prototxts). VGG16 conv1_1..conv5_3 without batch norm, pool3 with ceil mode so conv4_3 is 38x38 at
  300 input, pool5 3x3 stride 1, fc6 as a 3x3 conv with 1024 channels and dilation 6, fc7 as a 1x1 conv,
  then extra layers conv8..conv11 (and conv12 for 512). Sources: conv4_3 (through L2Norm), fc7 and the
  second conv of each extra block: maps 38, 19, 10, 5, 3, 1 and 64, 32, 16, 8, 4, 2, 1.
- ``ssd_tiny``: the same structure shrunk for CPU training in minutes (see ``_tiny_layers``).

The base is an ``nn.ModuleList`` named ``vgg`` indexed exactly like ssd.pytorch's ``vgg`` list (conv4_3's
ReLU is index 22, fc6 is 31, fc7 is 33), which makes ``ssd_core.backbone`` a plain key mapping.

``SSD.forward`` returns ``SSDOutput(loc [B, P, 4], cls_logits [B, P, C])`` in training and evaluation
alike, float32 even under autocast, in the order of ``generate_priors(model.prior_spec)``: level by
level, and inside a level row, column, then box.

Precision and layout, chosen by the caller: ``model.to(memory_format=torch.channels_last)`` (NHWC
convolutions: faster on CPU in fp32, and what makes bf16 fast; the head permutes become free views;
``benchmarks/bench_train_step.py`` measures the combinations); ``torch.autocast("cpu" | "cuda",
dtype=torch.bfloat16)``, or fp16 autocast with a GradScaler on GPU. L2Norm accumulates its norm in float32
and the outputs are cast to float32, so the loss and its hard-negative ranking never run in 16 bits. ReLUs
are in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ssd_core.layers import L2Norm, output_side
from ssd_core.priors import SSD300_VOC, SSD512_VOC, PriorSpec, generate_priors

logger = logging.getLogger(__name__)

# Heads start near zero so the first losses are those of uniform class scores and prior-sized boxes.
HEAD_INIT_STD = 0.01


class SSDOutput(NamedTuple):
    """Raw network predictions, in prior order."""

    loc: Tensor  # [B, P, 4] encoded offsets (see ssd_core.coding)
    cls_logits: Tensor  # [B, P, C] unnormalised class scores, class 0 = background


class SSD(nn.Module):
    """Single Shot MultiBox Detector.

    Args:
        preset: name recorded on the model (``model.preset``).
        num_classes: C, including background (class 0); at least 2.
        prior_spec: the prior grid; its feature maps must equal the network's source maps.
        base: layers up to fc7 (stored as ``self.vgg``).
        source_layer: number of ``base`` layers that produce the first source (conv4_3 + ReLU: 23).
        extras: one block per further source, each ending at that source's resolution.
        source_channels: channels of each source map, first (L2Norm'd) one first.

    Raises:
        ValueError: when the maps that the network makes from a ``prior_spec.image_size`` input differ
            from ``prior_spec.feature_maps``, or P from the heads differs from ``prior_spec.num_priors``.
    """

    def __init__(
        self,
        *,
        preset: str,
        num_classes: int,
        prior_spec: PriorSpec,
        base: Sequence[nn.Module],
        source_layer: int,
        extras: Sequence[nn.Module],
        source_channels: Sequence[int],
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"SSD: num_classes counts background too and must be an int >= 2, got {num_classes!r}")
        boxes = prior_spec.boxes_per_location
        if len(source_channels) != len(extras) + 2 or len(boxes) != len(source_channels):
            raise ValueError(
                f"SSD({preset}): the network has {len(extras) + 2} source maps ({len(source_channels)} channel "
                f"counts given) but prior_spec has {len(boxes)} levels {prior_spec.feature_maps}"
            )
        self.preset = preset
        self.num_classes = num_classes
        self.prior_spec = prior_spec
        self.image_size = prior_spec.image_size
        self.source_layer = source_layer
        self.vgg = nn.ModuleList(base)
        self.l2norm = L2Norm(source_channels[0])
        self.extras = nn.ModuleList(extras)
        self.loc = nn.ModuleList(
            nn.Conv2d(c, a * 4, kernel_size=3, padding=1) for c, a in zip(source_channels, boxes, strict=True)
        )
        self.conf = nn.ModuleList(
            nn.Conv2d(c, a * num_classes, kernel_size=3, padding=1) for c, a in zip(source_channels, boxes, strict=True)
        )
        self._check_against_priors()
        self.reset_parameters()

    def source_sides(self, image_size: int | None = None) -> tuple[int, ...]:
        """Side of every source map for a square input (default: ``self.image_size``), computed, not run."""
        side = self.image_size if image_size is None else image_size
        first = output_side(self.vgg[: self.source_layer], side)
        sides = [first, output_side(self.vgg[self.source_layer :], first)]
        for block in self.extras:
            sides.append(output_side([block], sides[-1]))
        return tuple(sides)

    def _check_against_priors(self) -> None:
        spec = self.prior_spec
        sides = self.source_sides()
        if sides != tuple(spec.feature_maps):
            raise ValueError(
                f"SSD({self.preset}): at {spec.image_size}x{spec.image_size} input the network's source maps "
                f"are {sides}, but prior_spec.feature_maps is {tuple(spec.feature_maps)}"
            )
        num_priors = sum(s * s * (head.out_channels // 4) for s, head in zip(sides, self.loc, strict=True))
        if num_priors != spec.num_priors:
            raise ValueError(
                f"SSD({self.preset}): the heads predict {num_priors} boxes but prior_spec has {spec.num_priors}"
            )

    def reset_parameters(self) -> None:
        """Kaiming init for the base (it feeds ReLUs; He et al. 2015), Xavier for the extra layers
        (the original SSD), N(0, 0.01) for the heads, BatchNorm at identity, L2Norm at its initial scale."""
        for module in self.vgg.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.extras.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in [*self.loc, *self.conf]:
            nn.init.normal_(module.weight, std=HEAD_INIT_STD)
            nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
        self.l2norm.reset_parameters()

    def priors(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The model's priors ``[P, 4]`` cxcywh, normalised: ``generate_priors(self.prior_spec)``."""
        return generate_priors(self.prior_spec, dtype=dtype)

    def forward(self, images: Tensor) -> SSDOutput:
        """Predict box offsets and class logits for every prior.

        Args:
            images: ``[B, 3, S, S]`` float, already normalised, ``S = self.image_size``; any memory format.

        Returns:
            ``SSDOutput(loc [B, P, 4], cls_logits [B, P, C])``, float32 (also under autocast).
        """
        size = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise ValueError(
                f"SSD({self.preset}).forward: expected images [B, 3, {size}, {size}], got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"SSD({self.preset}).forward: expected float images (normalised), got {images.dtype}")
        batch = images.shape[0]
        x = images
        sources = []
        for index, layer in enumerate(self.vgg):
            if index == self.source_layer:
                sources.append(self.l2norm(x))  # conv4_3
            x = layer(x)
        sources.append(x)  # fc7
        for block in self.extras:
            x = block(x)
            sources.append(x)
        locs, logits = [], []
        for source, loc_head, conf_head in zip(sources, self.loc, self.conf, strict=True):
            # [B, A*4, H, W] -> [B, H, W, A*4] -> [B, H*W*A, 4]: row, column, box, as generate_priors.
            # With channels_last the permute is free and reshape makes no copy.
            locs.append(loc_head(source).permute(0, 2, 3, 1).reshape(batch, -1, 4))
            logits.append(conf_head(source).permute(0, 2, 3, 1).reshape(batch, -1, self.num_classes))
        return SSDOutput(torch.cat(locs, dim=1).float(), torch.cat(logits, dim=1).float())  # [B, P, 4], [B, P, C]


# ----------------------------------------------------------------------------------------------- layers
def _conv(
    cin: int,
    cout: int,
    kernel: int = 3,
    *,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    batch_norm: bool = False,
) -> list[nn.Module]:
    """conv -> [BN] -> ReLU. The conv has no bias when BN follows (BN's shift replaces it)."""
    pad = dilation * (kernel // 2) if padding is None else padding
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _extra_block(
    cin: int, mid: int, cout: int, kernel: int, stride: int, padding: int, batch_norm: bool = False
) -> nn.Sequential:
    """One extra source: 1x1 bottleneck to ``mid`` channels, then a conv that shrinks the map."""
    return nn.Sequential(
        *_conv(cin, mid, 1, padding=0, batch_norm=batch_norm),
        *_conv(mid, cout, kernel, stride=stride, padding=padding, batch_norm=batch_norm),
    )


def _vgg16_layers() -> list[nn.Module]:
    """VGG16 conv1_1..conv5_3, pool5 3x3/s1, fc6 (3x3, dilation 6) and fc7 (1x1) as convs.

    Index = ssd.pytorch ``vgg`` index: convs at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 (the same
    numbers as torchvision's ``features``), conv4_3's ReLU at 22, fc6 at 31, fc7 at 33.
    """
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512)
    layers: list[nn.Module] = []
    cin = 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        elif item == "C":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))  # 75 -> 38 at 300 input
        else:
            layers += _conv(cin, item)
            cin = item
    layers.append(nn.MaxPool2d(3, stride=1, padding=1))  # pool5
    layers += _conv(512, 1024, 3, dilation=6)  # fc6: atrous, 6 = 2x2-s2 pool5 removed, 7x7 -> 3x3 taps
    layers += _conv(1024, 1024, 1)  # fc7
    return layers


VGG16_SOURCE_LAYER = 23  # vgg[:23] ends with conv4_3's ReLU


def _build_ssd300(num_classes: int, prior_spec: PriorSpec) -> SSD:
    extras = [
        _extra_block(1024, 256, 512, 3, 2, 1),  # conv8: 19 -> 10
        _extra_block(512, 128, 256, 3, 2, 1),  # conv9: 10 -> 5
        _extra_block(256, 128, 256, 3, 1, 0),  # conv10: 5 -> 3
        _extra_block(256, 128, 256, 3, 1, 0),  # conv11: 3 -> 1
    ]
    return SSD(
        preset="ssd300_vgg16",
        num_classes=num_classes,
        prior_spec=prior_spec,
        base=_vgg16_layers(),
        source_layer=VGG16_SOURCE_LAYER,
        extras=extras,
        source_channels=(512, 1024, 512, 256, 256, 256),
    )


def _build_ssd512(num_classes: int, prior_spec: PriorSpec) -> SSD:
    extras = [
        _extra_block(1024, 256, 512, 3, 2, 1),  # conv8: 32 -> 16
        _extra_block(512, 128, 256, 3, 2, 1),  # conv9: 16 -> 8
        _extra_block(256, 128, 256, 3, 2, 1),  # conv10: 8 -> 4
        _extra_block(256, 128, 256, 3, 2, 1),  # conv11: 4 -> 2
        _extra_block(256, 128, 256, 4, 1, 1),  # conv12: 2 -> 1 (Caffe SSD512: 4x4 kernel, pad 1)
    ]
    return SSD(
        preset="ssd512_vgg16",
        num_classes=num_classes,
        prior_spec=prior_spec,
        base=_vgg16_layers(),
        source_layer=VGG16_SOURCE_LAYER,
        extras=extras,
        source_channels=(512, 1024, 512, 256, 256, 256, 256),
    )


# ------------------------------------------------------------------------------------------------ tiny
TINY_IMAGE_SIZE = 160
# Priors for 160x160 input: maps 20, 10, 5, 3, 1 (strides 8, 16, 32, 53, 160). The first level uses 0.08
# of the side (13 px, like SSD300's conv4_3 at 0.1) so small objects get close priors; the paper's
# linear rule spreads 0.18..0.78 over the other levels and the last level's extra square reaches 0.88,
# covering objects up to ~80% of the image.
SSD_TINY_PRIORS = PriorSpec.from_scales(
    TINY_IMAGE_SIZE,
    feature_maps=(20, 10, 5, 3, 1),
    aspect_ratios=((2,), (2, 3), (2, 3), (2,), (2,)),
    first_scale=0.08,
    s_min=0.18,
    s_max=0.78,
)


def _tiny_layers() -> tuple[list[nn.Module], int, tuple[int, ...], list[nn.Sequential]]:
    """A narrow VGG-style base with batch norm for 160x160 input (~1.3 M parameters with 6 classes).

    Sources (channels @ side): 128 @ 20 (after L2Norm), 256 @ 10 ("fc7"), then 128 @ 5, 3, 1; 2,390 priors.
    Its step time in each precision and memory layout: ``benchmarks/bench_train_step.py``.

    Batch norm after every conv (absent from the VGG presets, which follow the paper) lets this
    from-scratch model train quickly at high learning rates. The first two convs have stride 2 instead
    of VGG's conv + pool pairs: at 160x160 and 80x80 the early layers are memory-bound on CPU (a
    full-resolution conv stage with its BN, ReLU and pool costs a large share of the step), and objects
    below ~5 px are out of reach at any rate.
    """
    bn = {"batch_norm": True}
    base: list[nn.Module] = [
        *_conv(3, 16, stride=2, **bn),  # 160 -> 80
        *_conv(16, 32, stride=2, **bn),  # 80 -> 40
        *_conv(32, 64, **bn),
        nn.MaxPool2d(2, 2),  # 40 -> 20
        *_conv(64, 96, **bn),
        *_conv(96, 128, **bn),  # "conv4_3": first source, 20x20, stride 8
    ]
    source_layer = len(base)
    base += [
        nn.MaxPool2d(2, 2),  # 20 -> 10
        *_conv(128, 128, **bn),  # "conv5"
        nn.MaxPool2d(3, stride=1, padding=1),  # pool5
        *_conv(128, 256, 3, dilation=3, **bn),  # "fc6": atrous; 3 ~ 6 * 10/19 scaled from SSD300's 19x19
        *_conv(256, 256, 1, **bn),  # "fc7": second source, 10x10
    ]
    extras = [
        _extra_block(256, 64, 128, 3, 2, 1, **bn),  # 10 -> 5
        _extra_block(128, 64, 128, 3, 1, 0, **bn),  # 5 -> 3
        _extra_block(128, 64, 128, 3, 1, 0, **bn),  # 3 -> 1
    ]
    return base, source_layer, (128, 256, 128, 128, 128), extras


def _build_tiny(num_classes: int, prior_spec: PriorSpec) -> SSD:
    base, source_layer, channels, extras = _tiny_layers()
    return SSD(
        preset="ssd_tiny",
        num_classes=num_classes,
        prior_spec=prior_spec,
        base=base,
        source_layer=source_layer,
        extras=extras,
        source_channels=channels,
    )


# --------------------------------------------------------------------------------------------- presets
_BUILDERS: dict[str, Callable[[int, PriorSpec], SSD]] = {
    "ssd_tiny": _build_tiny,
    "ssd300_vgg16": _build_ssd300,
    "ssd512_vgg16": _build_ssd512,
}
PRESET_PRIORS: dict[str, PriorSpec] = {
    "ssd_tiny": SSD_TINY_PRIORS,
    "ssd300_vgg16": SSD300_VOC,
    "ssd512_vgg16": SSD512_VOC,
}
PRESETS: tuple[str, ...] = tuple(_BUILDERS)
VGG16_PRESETS: tuple[str, ...] = ("ssd300_vgg16", "ssd512_vgg16")


def build_ssd(preset: str, num_classes: int, *, prior_spec: PriorSpec | None = None) -> SSD:
    """Build an SSD preset with freshly initialised weights.

    Args:
        preset: one of ``PRESETS``.
        num_classes: C, including background.
        prior_spec: priors to use instead of the preset's ``PRESET_PRIORS[preset]`` (e.g. ``SSD300_COCO``);
            its image size and feature maps must fit the network.
    """
    if preset not in _BUILDERS:
        raise ValueError(f"build_ssd: unknown preset {preset!r}; expected one of {PRESETS}")
    spec = PRESET_PRIORS[preset] if prior_spec is None else prior_spec
    if not isinstance(spec, PriorSpec):
        raise TypeError(f"build_ssd: prior_spec must be a PriorSpec, got {type(spec).__name__}")
    model = _BUILDERS[preset](num_classes, spec)
    logger.debug(
        "built %s: %d classes, %d priors, %d parameters",
        preset,
        num_classes,
        spec.num_priors,
        sum(p.numel() for p in model.parameters()),
    )
    return model
