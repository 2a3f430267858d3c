"""The one model builder: ``ModelConfig`` and the class list -> an ``SSD`` with the priors the config names.

Train, resume and the driver's checks build through ``build_model``; evaluate, predict, export and the
end of training rebuild a recorded model through ``build_recorded``, from the full ``PriorSpec`` that the
model file or checkpoint stores (``PriorSpec.to_dict``), never from the preset's name.

``model.priors`` picks the default boxes:

- ``voc`` / ``coco``: the original Caffe models' boxes for ``ssd300_vgg16`` / ``ssd512_vgg16``
  (``ssd_core.priors``); ``ssd_tiny`` has one preset set of boxes, its own, selected by ``voc``;
- ``custom``: ``model.prior_spec``'s sizes and ratios on the network's own feature maps, in pixels at the
  input side (``python -m pipeline fit-priors`` writes them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipeline.config_schema import ModelConfig, PriorSpecConfig, TrainConfig
from ssd_core.model import PRESET_PRIORS, SSD, build_ssd
from ssd_core.priors import SSD300_COCO, SSD300_VOC, SSD512_COCO, SSD512_VOC, PriorSpec

# (preset, model.priors) -> the spec; ssd_tiny's own priors stand for "voc", it has no COCO set.
PRESET_CHOICES: dict[tuple[str, str], PriorSpec] = {
    ("ssd_tiny", "voc"): PRESET_PRIORS["ssd_tiny"],
    ("ssd300_vgg16", "voc"): SSD300_VOC,
    ("ssd300_vgg16", "coco"): SSD300_COCO,
    ("ssd512_vgg16", "voc"): SSD512_VOC,
    ("ssd512_vgg16", "coco"): SSD512_COCO,
}


def prior_spec_for(model: ModelConfig) -> PriorSpec:
    """The priors ``model`` asks for.

    Raises:
        ValueError: naming the key (``model.priors`` or ``model.prior_spec.<field>``) and what it needs.
    """
    problems = model_problems(model)
    if problems:
        raise ValueError("; ".join(problems))
    return _spec(model)


def build_model(model: ModelConfig, classes: Sequence[str]) -> SSD:
    """A freshly initialised SSD of ``model.preset`` for ``classes`` (background added) with its priors.

    Raises:
        ValueError: the priors do not fit the preset (key named), or no classes.
    """
    if not classes:
        raise ValueError("build_model: expected at least one class name, got none")
    return build_ssd(model.preset, len(classes) + 1, prior_spec=prior_spec_for(model))


def build_recorded(preset: str, num_classes: int, prior_spec: Mapping[str, Any]) -> SSD:
    """The SSD that a model file or checkpoint describes: its preset, class count and recorded priors.

    Raises:
        ValueError: the recorded priors are malformed or do not fit the preset.
    """
    return build_ssd(preset, num_classes, prior_spec=PriorSpec.from_dict(prior_spec))


def model_problems(model: ModelConfig) -> list[str]:
    """What ``load_params`` refuses in the model section, each naming its key; empty when it builds."""
    if model.priors != "custom":
        if _given(model.prior_spec):
            return [f"model.prior_spec: only read with model.priors=custom, but model.priors is {model.priors!r}"]
        if (model.preset, model.priors) not in PRESET_CHOICES:
            return [
                f"model.priors: {model.preset} has no {model.priors!r} preset boxes; use voc (its own) or "
                "custom with model.prior_spec"
            ]
        return []
    problems = _custom_problems(model.preset, model.prior_spec)
    if problems:
        return problems
    try:
        with torch.device("meta"):  # shapes only: checks the maps and head sizes without allocating weights
            build_ssd(model.preset, 2, prior_spec=_spec(model))
    except ValueError as error:
        return [f"model.prior_spec: {error}"]
    return []


def freeze_problems(model: ModelConfig, train: TrainConfig) -> list[str]:
    """``train.freeze`` prefixes that name no parameter of the model (a typo would freeze nothing, silently)."""
    if not train.freeze:
        return []
    with torch.device("meta"):
        names = [name for name, _ in build_ssd(model.preset, 2, prior_spec=_spec(model)).named_parameters()]
    unknown = [prefix for prefix in train.freeze if not prefix or not any(n.startswith(prefix) for n in names)]
    if not unknown:
        return []
    tops = sorted({n.split(".")[0] + "." for n in names})
    return [f"train.freeze: {unknown} match no parameter of {model.preset}; its parameters start with {tops}"]


def _spec(model: ModelConfig) -> PriorSpec:
    if model.priors != "custom":
        return PRESET_CHOICES[(model.preset, model.priors)]
    network = PRESET_PRIORS[model.preset]
    custom = model.prior_spec
    return PriorSpec(
        image_size=network.image_size,
        feature_maps=network.feature_maps,
        steps=tuple(float(s) for s in custom.steps) if custom.steps else network.steps,
        min_sizes=tuple(float(s) for s in custom.min_sizes),
        max_sizes=tuple(float(s) for s in custom.max_sizes),
        aspect_ratios=tuple(tuple(float(r) for r in ratios) for ratios in custom.aspect_ratios),
        clip=custom.clip,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _given(custom: PriorSpecConfig) -> bool:
    return bool(custom.min_sizes or custom.max_sizes or custom.aspect_ratios or custom.steps or custom.clip)


def _custom_problems(preset: str, custom: PriorSpecConfig) -> list[str]:
    """Per-field checks of ``model.prior_spec`` against the network's levels (count, maps, input side)."""
    network = PRESET_PRIORS[preset]
    levels, side = len(network.feature_maps), network.image_size
    where = f"{preset} has {levels} source maps {tuple(network.feature_maps)} at {side} px input"
    problems = []
    lists: dict[str, list[Any]] = {
        "min_sizes": list(custom.min_sizes),
        "max_sizes": list(custom.max_sizes),
        "aspect_ratios": list(custom.aspect_ratios),
    }
    if custom.steps:
        lists["steps"] = list(custom.steps)
    for name, values in lists.items():
        if len(values) != levels:
            problems.append(f"model.prior_spec.{name}: expected one entry per level ({where}), got {len(values)}")
    if problems:
        return problems
    for name in ("min_sizes", "max_sizes", "steps"):
        bad = [v for v in lists.get(name, []) if not (math.isfinite(v) and 0 < v <= 4 * side)]
        if bad:
            problems.append(f"model.prior_spec.{name}: expected sizes in (0, {4 * side}] input pixels, got {bad}")
    for k, (lo, hi) in enumerate(zip(custom.min_sizes, custom.max_sizes, strict=True)):
        if hi < lo:
            problems.append(f"model.prior_spec.max_sizes[{k}]: {hi} is smaller than min_sizes[{k}] = {lo}")
    for k, ratios in enumerate(custom.aspect_ratios):
        numbers = isinstance(ratios, list) and all(_is_number(r) for r in ratios)
        if not numbers or not all(math.isfinite(r) and 1 < r <= 100 for r in ratios) or len(set(ratios)) != len(ratios):
            problems.append(
                f"model.prior_spec.aspect_ratios[{k}]: expected distinct ratios in (1, 100] (each adds r and 1/r; "
                f"1 is always there), got {ratios!r}"
            )
    for k, (fmap, step) in enumerate(zip(network.feature_maps, lists.get("steps", []), strict=False)):
        if (fmap - 0.5) * step >= side:
            problems.append(
                f"model.prior_spec.steps[{k}]: the last of {fmap} centres, ({fmap} - 0.5) x {step}, lies outside "
                f"the {side} px input ({where})"
            )
    return problems
