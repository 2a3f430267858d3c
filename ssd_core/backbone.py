"""Load ImageNet-pretrained VGG16 weights into the base of an SSD300/SSD512 (``model.vgg``).

Two file layouts are accepted, told apart by their keys:

- **torchvision** (``torchvision.models.vgg16().state_dict()``): ``features.N.weight/bias`` for the 13
  convs (N = 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), ``classifier.0`` = fc6 ``[4096, 25088]``,
  ``classifier.3`` = fc7 ``[4096, 4096]``; ``classifier.6`` (the ImageNet classifier) is ignored.
  fc6 and fc7 are converted to SSD's smaller convolutions by subsampling, as in the paper (after
  DeepLab-LargeFOV):

  * fc6 reads pool5's 7x7x512 grid. As a conv it is ``[4096, 512, 7, 7]``; keeping every 4th output
    channel and the taps 0, 3, 6 of each kernel axis gives ``[1024, 512, 3, 3]``. SSD drops pool5's
    stride, so the map has stride 16 instead of 32, and the kept taps, 3 x 32 = 96 px apart in the
    original, are 6 x 16 px apart now: hence dilation 6.
  * fc7 ``[4096, 4096]``: every 4th output and input channel gives a ``[1024, 1024, 1, 1]`` conv.
  * Biases keep every 4th entry.

- **reduced fc** (ssd.pytorch's ``vgg16_reducedfc.pth``): already converted, keys ``N.weight/bias`` with
  N the index in ssd.pytorch's ``vgg`` list, which ``SSD.vgg`` shares: the 13 convs as above, fc6 at 31
  ``[1024, 512, 3, 3]``, fc7 at 33 ``[1024, 1024, 1, 1]``.

Files are read with ``torch.load(weights_only=True)``; nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch
from torch import Tensor

from ssd_core.model import SSD, VGG16_PRESETS

logger = logging.getLogger(__name__)

VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision features.N == SSD vgg.N
FC6_INDEX = 31  # SSD vgg index of fc6 (torchvision classifier.0)
FC7_INDEX = 33  # SSD vgg index of fc7 (torchvision classifier.3)
_FC_CHANNELS = 4096  # ImageNet VGG16's fc width
_POOL5 = (512, 7, 7)  # fc6's input: pool5's channels and grid
_SUBSAMPLE = 4  # 4096 -> 1024 channels
_TAP_STEP = 3  # taps 0, 3, 6 of 7
_IGNORED_TORCHVISION = ("classifier.6.weight", "classifier.6.bias")


def fc6_to_conv(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """fc6 ``[4096, 25088]`` and ``[4096]`` -> a 3x3 conv ``[1024, 512, 3, 3]`` and ``[1024]`` (use dilation 6)."""
    kernel = weight.reshape(_FC_CHANNELS, *_POOL5)  # [4096, 512, 7, 7]: flattened as (C, H, W)
    return kernel[::_SUBSAMPLE, :, ::_TAP_STEP, ::_TAP_STEP].contiguous(), bias[::_SUBSAMPLE].contiguous()


def fc7_to_conv(weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """fc7 ``[4096, 4096]`` and ``[4096]`` -> a 1x1 conv ``[1024, 1024, 1, 1]`` and ``[1024]``."""
    kernel = weight[::_SUBSAMPLE, ::_SUBSAMPLE]  # [1024, 1024]
    return kernel.reshape(*kernel.shape, 1, 1).contiguous(), bias[::_SUBSAMPLE].contiguous()


def _torchvision_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the torchvision layout that we read, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    cin = 3
    for index, cout in zip(
        VGG16_CONV_INDICES, (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512), strict=True
    ):
        shapes[f"features.{index}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{index}.bias"] = (cout,)
        cin = cout
    fc6_inputs = _POOL5[0] * _POOL5[1] * _POOL5[2]
    shapes.update(
        {
            "classifier.0.weight": (_FC_CHANNELS, fc6_inputs),
            "classifier.0.bias": (_FC_CHANNELS,),
            "classifier.3.weight": (_FC_CHANNELS, _FC_CHANNELS),
            "classifier.3.bias": (_FC_CHANNELS,),
        }
    )
    return shapes


def _reduced_shapes(model: SSD) -> dict[str, tuple[int, ...]]:
    """Every key of the reduced-fc layout, with the shape the model's ``vgg`` layer has."""
    shapes = {}
    for index in (*VGG16_CONV_INDICES, FC6_INDEX, FC7_INDEX):
        layer = model.vgg[index]
        shapes[f"{index}.weight"] = tuple(layer.weight.shape)
        shapes[f"{index}.bias"] = tuple(layer.bias.shape)
    return shapes


def _check_keys(
    state: Mapping[str, Tensor], expected: dict[str, tuple[int, ...]], ignored: tuple[str, ...], where: str
) -> None:
    """Raise one ValueError listing every missing key, unexpected key and shape mismatch."""
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in ignored)
    wrong = [
        f"{k}: expected {list(shape)}, got {list(state[k].shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"shape mismatches [{'; '.join(wrong)}]")
    if problems:
        raise ValueError(f"{where}: " + ", ".join(problems))


def load_vgg16_backbone(model: SSD, path: str | os.PathLike[str]) -> None:
    """Copy ImageNet VGG16 weights from ``path`` into ``model.vgg`` (conv1_1..conv5_3, fc6, fc7), in place.

    Args:
        model: an ``ssd300_vgg16`` or ``ssd512_vgg16`` model (any device; weights are cast and moved).
        path: a state dict in torchvision or reduced-fc layout (see the module docstring).

    Raises:
        ValueError: for another preset, a file of neither layout, or missing/unexpected keys and shape
            mismatches (all listed). The model is unchanged when anything is wrong.
        TypeError: when the file holds something other than a dict of tensors.
    """
    preset = getattr(model, "preset", None)
    if preset not in VGG16_PRESETS:
        raise ValueError(
            f"load_vgg16_backbone: an ImageNet VGG16 backbone fits only the presets {VGG16_PRESETS}, "
            f"got a model of preset {preset!r}"
        )
    where = f"load_vgg16_backbone({os.fspath(path)!r})"
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(f"{where}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor))
    if not_tensors:
        raise TypeError(f"{where}: expected str keys and tensor values; these are not: {not_tensors}")

    if any(k.startswith(("features.", "classifier.")) for k in state):
        layout = "torchvision"
        _check_keys(state, _torchvision_shapes(), _IGNORED_TORCHVISION, f"{where} (torchvision VGG16 layout)")
        reduced = {f"{i}.{p}": state[f"features.{i}.{p}"] for i in VGG16_CONV_INDICES for p in ("weight", "bias")}
        fc6 = fc6_to_conv(state["classifier.0.weight"], state["classifier.0.bias"])
        fc7 = fc7_to_conv(state["classifier.3.weight"], state["classifier.3.bias"])
        reduced.update(
            {
                f"{FC6_INDEX}.weight": fc6[0],
                f"{FC6_INDEX}.bias": fc6[1],
                f"{FC7_INDEX}.weight": fc7[0],
                f"{FC7_INDEX}.bias": fc7[1],
            }
        )
    elif any(k.split(".", 1)[0].isdigit() for k in state):
        layout = "reduced fc"
        reduced = dict(state)
    else:
        raise ValueError(
            f"{where}: neither the torchvision VGG16 layout (features.N.*, classifier.N.*) nor the reduced-fc "
            f"layout (N.weight, N.bias); first keys: {sorted(state)[:5]}"
        )
    _check_keys(reduced, _reduced_shapes(model), (), f"{where} ({layout} layout)")

    with torch.no_grad():
        for name, tensor in reduced.items():
            index, kind = name.split(".")
            getattr(model.vgg[int(index)], kind).copy_(tensor)
    logger.info("loaded the VGG16 backbone of %s from %s (%s layout)", preset, os.fspath(path), layout)
