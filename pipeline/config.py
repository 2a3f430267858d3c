"""Typed, validated parameters: ``params.yaml`` + command-line dotlist overrides -> ``Params``.

``params.yaml`` is the one source of values. It is merged over the dataclass schema below with
OmegaConf, so that an unknown key, a wrong type or an out-of-range value fails before any work starts,
with a message that names the full key path and what is allowed::

    train.lrr: unknown key; did you mean train.lr?
    train.lr: expected float, got 'fast' (str)
    train.lr: must be > 0, got -0.1
    train.lr: expected a finite number, got inf

Every float must be finite and every int has an upper bound (a size, a count, a step number or a
seed), so an absurd value is refused here, naming its key, rather than deep inside a worker.

Environment interpolation (``${oc.env:VAR,default}``) is resolved once, here, on the driver; workers
receive the resolved ``Params`` object and never re-read files.

Paths are not parameters: ``dvc.yaml`` names them and passes them to the stages.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A parameter file or override that does not fit the schema; the message names the key path."""


def _p(
    default: Any, *, ge=None, gt=None, le=None, lt=None, choices=None, pattern: str | None = None, help: str = ""
) -> Any:
    """A schema field with its allowed range, choices or (strings) full-match pattern, checked after merging,
    and a one-line reason."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "pattern": pattern, "help": help}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Upper bounds shared by several fields, each far beyond any sensible value and far below an overflow.
SEED_MAX = 2**32 - 1  # np.random.seed takes 0..2^32-1: a seed in that range means the same to every library
MAX_STEPS = 100_000_000  # optimiser steps: ~400x the longest recipe here (COCO, 240k)
MAX_IMAGES = 100_000_000  # images in a split: ~50x Open Images (1.9 M)
MAX_BATCH = 4096  # images per forward pass on one worker: beyond any accelerator's memory at SSD sizes
MAX_PROCESSES = 256  # processes or threads on one machine (loader workers, intra-op threads)
# A run folder name: starts with a letter or digit, at most 64 of [A-Za-z0-9._-], no "..": never a path.
RUN_NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


# --------------------------------------------------------------------------------------------- data
@dataclass
class SyntheticConfig:
    num_train: int = _p(1600, ge=1, le=MAX_IMAGES, help="images in the generated training split")
    num_val: int = _p(200, ge=1, le=MAX_IMAGES, help="images in the generated validation split")
    image_size: int = _p(160, ge=32, le=4096, help="side of the square generated images, pixels")
    max_objects: int = _p(6, ge=1, le=50, help="upper bound on objects per image")
    seed: int = _p(0, ge=0, le=SEED_MAX, help="generator seed: one seed, one dataset")


@dataclass
class VocConfig:
    train_sets: list[str] = _p(["trainval"], help="ImageSets/Main lists that make the training split")
    val_sets: list[str] = _p(["test"], help="ImageSets/Main lists that make the validation split")
    annotations_dir: str = _p("", help="flat layout: folder of XML files (empty: detect)")
    images_dir: str = _p("", help="flat layout: folder of images (empty: detect)")


@dataclass
class CocoConfig:
    train_json: str = _p("", help="instances JSON of the training split")
    train_images: str = _p("", help="image folder of the training split")
    val_json: str = _p("", help="instances JSON of the validation split")
    val_images: str = _p("", help="image folder of the validation split")


@dataclass
class DataConfig:
    source: str = _p("synthetic", choices=("synthetic", "voc", "coco"), help="where prepare reads from")
    root: Any = _p("", help="voc: a dataset root, or a list of roots to combine (VOC07+12)")
    classes: list[str] = _p([], help="class names in label order (empty: discovered from the data)")
    strict_classes: bool = _p(False, help="fail on a class name not in data.classes instead of counting it")
    val_fraction: float = _p(0.1, gt=0.0, lt=1.0, help="seeded validation split when no split lists exist")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    voc: VocConfig = field(default_factory=VocConfig)
    coco: CocoConfig = field(default_factory=CocoConfig)

    @property
    def roots(self) -> list[str]:
        """``root`` as a list, whether one path or several were given."""
        if isinstance(self.root, str):
            return [self.root] if self.root else []
        return [str(r) for r in self.root]


@dataclass
class PrepareConfig:
    max_bad_fraction: float = _p(0.05, ge=0.0, le=1.0, help="fail when more images than this are rejected")
    max_image_pixels: int = _p(
        89_478_485,
        ge=1,
        le=250_000_000,
        help="decompression-bomb guard (PIL's default limit); at most 250 Mpx, 750 MB decoded RGB per image",
    )


@dataclass
class ShardConfig:
    maxcount: int = _p(500, ge=1, le=1_000_000, help="samples per shard at most")
    maxsize: int = _p(256_000_000, ge=1_000_000, le=100_000_000_000, help="bytes per shard at most (<= 100 GB)")
    max_side: int = _p(
        0,
        ge=0,
        le=65_535,
        help="downscale images whose longer side exceeds this (0: never; 65,535 is JPEG's largest side)",
    )
    jpeg_quality: int = _p(95, ge=1, le=100, help="quality of re-encoded images")


# -------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    preset: str = _p("ssd_tiny", choices=("ssd_tiny", "ssd300_vgg16", "ssd512_vgg16"), help="architecture and priors")
    priors: str = _p(
        "voc", choices=("voc", "coco"), help="VGG presets: default-box sizes of the Caffe VOC or COCO model"
    )
    pretrained_backbone: str = _p("", help="path to an ImageNet VGG16 state dict (empty: random init)")


@dataclass
class AugmentConfig:
    photometric: bool = _p(True, help="brightness, contrast, saturation, hue in random order")
    expand: bool = _p(True, help="zoom out onto a mean-filled canvas")
    expand_max_ratio: float = _p(
        4.0,
        le=16.0,
        help="largest canvas side / image side (>= 1: ssd_core.augment.AugmentOptions decides); "
        "the canvas grows with its square, 16 makes a 500 px image an 8000 px canvas",
    )
    crop: bool = _p(True, help="min-IoU random crop")
    flip: bool = _p(True, help="horizontal flip with probability 0.5")


# -------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    num_workers: int = _p(2, ge=1, le=1024, help="Ray Train workers (DDP ranks); 1024 GPUs at most")
    threads_per_worker: int = _p(1, ge=1, le=MAX_PROCESSES, help="torch intra-op threads per worker")
    use_gpu: bool = _p(False, help="one GPU per worker, NCCL backend")
    loader_workers: int = _p(1, ge=0, le=MAX_PROCESSES, help="DataLoader worker processes per rank")
    batch_size: int = _p(32, ge=1, le=MAX_BATCH, help="images per step per worker")
    lr: float = _p(1e-3, gt=0.0, help="learning rate at lr_reference_batch global images per step")
    lr_reference_batch: int = _p(32, ge=1, le=1024 * MAX_BATCH, help="lr scales linearly with global batch / this")
    optimizer: str = _p("sgd", choices=("sgd", "adamw"), help="sgd (paper) or adamw (decoupled weight decay)")
    momentum: float = _p(0.9, ge=0.0, lt=1.0, help="SGD momentum (paper); adamw: beta1")
    weight_decay: float = _p(5e-4, ge=0.0, help="sgd: L2 weight decay (paper); adamw: decoupled decay")
    max_steps: int = _p(1000, ge=1, le=MAX_STEPS, help="optimiser steps in the whole run")
    warmup_steps: int = _p(100, ge=0, le=MAX_STEPS, help="linear warm-up from 0.001 x lr")
    schedule: str = _p("cosine", choices=("multistep", "cosine"), help="decay after warm-up")
    milestones: list[int] = _p(
        [], help="multistep: strictly increasing steps in 1..max_steps at which lr is multiplied by gamma"
    )
    gamma: float = _p(0.1, gt=0.0, le=1.0, help="multistep decay factor")
    grad_clip_norm: float = _p(10.0, ge=0.0, help="clip the global gradient norm (0: off)")
    precision: str = _p("fp32", choices=("fp32", "bf16", "fp16"), help="autocast dtype (fp16: GPU only)")
    channels_last: bool = _p(False, help="NHWC memory format for convolutions")
    iou_threshold: float = _p(0.5, gt=0.0, le=1.0, help="prior/box IoU that makes a positive")
    neg_pos_ratio: int = _p(3, ge=1, le=1000, help="hard negatives per positive (paper: 3)")
    loss_normalize: str = _p("batch", choices=("batch", "per_image"), help="divide by N over the batch")
    checkpoint_every_steps: int = _p(200, ge=1, le=MAX_STEPS, help="rank 0 writes a checkpoint this often")
    keep_checkpoints: int = _p(2, ge=1, le=1000, help="newest checkpoints kept")
    max_failures: int = _p(3, ge=0, le=1000, help="worker-group restarts allowed")
    max_consecutive_skips: int = _p(20, ge=1, le=MAX_STEPS, help="non-finite steps in a row before the run stops")
    resume: bool = _p(True, help="continue from the newest checkpoint of the same run")
    run_name: str = _p(
        "ssd",
        pattern=RUN_NAME_PATTERN,
        help="Ray Train run name; with storage_path, the identity used to resume; a folder name, never a path",
    )
    storage_path: str = _p("runs", help="checkpoints: local path or URL; the run folder is <run_name>-<digest>")
    log_every_steps: int = _p(10, ge=1, le=MAX_STEPS, help="progress line and step metrics interval")


# --------------------------------------------------------------------------------------- evaluate
@dataclass
class EvalConfig:
    batch_size: int = _p(16, ge=1, le=MAX_BATCH, help="images per forward pass")
    num_workers: int = _p(1, ge=0, le=MAX_PROCESSES, help="loader worker processes for evaluation")
    score_threshold: float = _p(0.01, ge=0.0, lt=1.0, help="per-class score threshold (original: 0.01)")
    nms_iou: float = _p(0.45, gt=0.0, le=1.0, help="NMS IoU threshold (original: 0.45)")
    top_k: int = _p(
        400,
        ge=1,
        le=32_768,
        help="candidates per class before NMS (original: 400); "
        "32,768 is more than any preset's priors (SSD512: 24,564)",
    )
    max_detections: int = _p(200, ge=1, le=32_768, help="detections per image after NMS (original: 200)")
    num_sample_images: int = _p(16, ge=0, le=256, help="validation images drawn in the detection grid")


# --------------------------------------------------------------------------------------- tracking
@dataclass
class TrackingConfig:
    enabled: bool = _p(True, help="record runs in MLflow")
    experiment: str = _p("ssd", help="MLflow experiment name")
    uri: str = _p("", help="tracking URI (empty: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db)")
    grad_stats_every: int = _p(50, ge=0, le=MAX_STEPS, help="per-layer gradient statistics interval (0: off)")
    connect_timeout_s: float = _p(10.0, gt=0.0, help="give up on an unreachable server after this long")
    register_model: bool = _p(True, help="register the final model in the MLflow registry")
    model_name: str = _p("ssd", help="registered model name")


@dataclass
class Params:
    seed: int = _p(0, ge=0, le=SEED_MAX, help="one seed for splits, initialisation, data order and augmentation")
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# ------------------------------------------------------------------------------------- loading
def load_params(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Params:
    """Read ``path`` (a params.yaml; None: defaults only), apply dotlist ``overrides``, validate.

    An override with an empty value (``tracking.uri=``) sets a string key to the empty string; for a key of
    any other type it is refused (OmegaConf would read it as null).

    Raises:
        ConfigError: naming the key path and what is allowed, for unknown keys, wrong types,
            out-of-range or non-finite values, malformed overrides and unreadable files; also for
            augmentation options that ``ssd_core`` refuses, so that no worker meets them first.
    """
    overrides = [_empty_value_override(item) for item in overrides]
    try:
        sources = [OmegaConf.structured(Params)]
        if path is not None:
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, Mapping) and loaded is not None:
                raise ConfigError(f"{path}: expected a mapping of sections at the top level")
            sources.append(loaded)
        sources.append(OmegaConf.from_dotlist(overrides))
        merged = OmegaConf.merge(*sources)
        params = OmegaConf.to_object(merged)  # resolves ${oc.env:...} interpolations, once
    except FileNotFoundError as error:
        raise ConfigError(f"{path}: parameter file not found") from error
    except ConfigKeyError as error:
        raise ConfigError(_unknown_key_message(error)) from None
    except ValidationError as error:
        raise ConfigError(_type_message(error)) from None
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "params"
        raise ConfigError(f"{key}: {_first_line(error)}") from None
    assert isinstance(params, Params)
    problems = [*_range_problems(params, ""), *_section_problems(params)]
    if not any(problem.startswith("augment.") for problem in problems):
        problems += _augment_problems(params.augment)
    if problems:
        raise ConfigError("; ".join(problems))
    return params


def params_from_dict(values: Mapping[str, Any]) -> Params:
    """Rebuild and re-validate ``Params`` from ``params_to_dict`` output (e.g. read from a checkpoint)."""
    return load_params(None, [f"{k}={_dotlist_value(v)}" for k, v in flatten(values).items()])


def params_to_dict(params: Params) -> dict[str, Any]:
    """Plain nested dict of ``params`` (JSON/YAML-safe), e.g. to store in a checkpoint."""
    return dataclasses.asdict(params)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}} -> {"train.lr": 0.1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _empty_value_override(item: str) -> str:
    """``KEY=`` -> ``KEY=''`` for a string key (and ``data.root``, a path or a list); refused for other types.

    Unknown keys pass through unchanged, for the unknown-key message with its suggestion.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=0.01")
    key, value = item.split("=", 1)
    if value.strip():
        return item
    parts = key.split(".")
    holder = _schema_at(parts[:-1])
    if holder is None or parts[-1] not in typing.get_type_hints(holder):
        return item
    expected = typing.get_type_hints(holder)[parts[-1]]
    if expected is str or expected is Any:
        return f"{key}=''"
    expected_name = getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
    if dataclasses.is_dataclass(expected):
        expected_name = f"a mapping (section {key})"
    elif typing.get_origin(expected) is list:
        expected_name = f"{expected} (none: {key}=[])"
    raise ConfigError(f"{key}: expected {expected_name}, got an empty value")


def _dotlist_value(value: Any) -> str:
    return OmegaConf.to_yaml({"v": value}).split(":", 1)[1].strip() if value != "" else "''"


# ----------------------------------------------------------------------------------- messages
def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _schema_at(path: list[str]) -> type | None:
    """The dataclass type that holds the field at ``path`` (all but the last part), or None."""
    node: Any = Params
    for part in path:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return None
        node = typing.get_type_hints(node)[part]
    return node if dataclasses.is_dataclass(node) else None


def _unknown_key_message(error: ConfigKeyError) -> str:
    full_key = str(getattr(error, "full_key", "") or getattr(error, "key", "") or "")
    parts = full_key.split(".") if full_key else []
    holder = _schema_at(parts[:-1]) if parts else None
    if holder is None:
        return f"{full_key or 'params'}: {_first_line(error)}"
    prefix = ".".join(parts[:-1])
    names = [f.name for f in dataclasses.fields(holder)]
    close = difflib.get_close_matches(parts[-1], names, n=1, cutoff=0.6)
    where = f"{prefix}." if prefix else ""
    if close:
        return f"{full_key}: unknown key; did you mean {where}{close[0]}?"
    return f"{full_key}: unknown key; allowed keys in {prefix or 'the top level'}: {', '.join(names)}"


def _type_message(error: ValidationError) -> str:
    full_key = str(getattr(error, "full_key", "") or "")
    parts = full_key.split(".") if full_key else []
    holder = _schema_at(parts[:-1]) if parts else None
    got = getattr(error, "value", None)
    if holder is None or parts[-1] not in typing.get_type_hints(holder):
        return f"{full_key or 'params'}: {_first_line(error)}"
    expected = typing.get_type_hints(holder)[parts[-1]]
    expected_name = getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
    if dataclasses.is_dataclass(expected):
        expected_name = f"a mapping (section {full_key})"
    return f"{full_key}: expected {expected_name}, got {got!r} ({type(got).__name__})"


def _range_problems(node: Any, prefix: str) -> Iterable[str]:
    """Per field: floats finite, then the ``_p`` choices, pattern and bounds of every field."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _range_problems(value, key + ".")
            continue
        if hints[f.name] is float and not math.isfinite(value):
            yield f"{key}: expected a finite number, got {value!r}"
            continue
        meta = f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            allowed = ", ".join(repr(c) for c in meta["choices"])
            yield f"{key}: must be one of {allowed}, got {value!r}"
        if meta.get("pattern") is not None and not re.fullmatch(meta["pattern"], value):
            yield f"{key}: expected a name matching {meta['pattern']}, got {value!r}"
        for bound, ok, word in (
            ("ge", lambda v, b: v >= b, ">="),
            ("gt", lambda v, b: v > b, ">"),
            ("le", lambda v, b: v <= b, "<="),
            ("lt", lambda v, b: v < b, "<"),
        ):
            limit = meta.get(bound)
            if limit is not None and not ok(value, limit):
                yield f"{key}: must be {word} {limit}, got {value!r}"
    if isinstance(node, DataConfig):
        root = node.root
        if not (isinstance(root, str) or (isinstance(root, list) and all(isinstance(r, str) for r in root))):
            yield f"{prefix}root: expected a path or a list of paths, got {root!r}"


def _section_problems(params: Params) -> Iterable[str]:
    """Rules between the values of one list or section: class names, the multistep schedule."""
    classes = params.data.classes
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        yield f"data.classes: expected distinct names, got {repeated} more than once"
    if "" in [name.strip() for name in classes]:
        yield f"data.classes: expected non-empty names, got {classes}"
    train = params.train
    milestones = list(train.milestones)
    # The schedule counts steps 1..max_steps; under cosine the milestones are unused, so only their form counts.
    last = train.max_steps if train.schedule == "multistep" else MAX_STEPS
    if milestones != sorted(set(milestones)) or any(not 0 < m <= last for m in milestones):
        yield f"train.milestones: expected strictly increasing steps in 1..{last}, got {milestones}"


def _augment_problems(augment: AugmentConfig) -> list[str]:
    """What ``ssd_core``'s own ``AugmentOptions`` refuses, named by its key under ``augment``.

    The workers build the same object from ``params.augment``; building it here moves its refusal before
    Ray starts. ssd_core (torch) is imported only when parameters are validated, not when the CLI starts.
    """
    from ssd_core.augment import AugmentOptions

    try:
        AugmentOptions(**dataclasses.asdict(augment))
    except (TypeError, ValueError) as error:
        named = re.match(r"AugmentOptions\.(\w+): (.*)", _first_line(error))
        return [f"augment.{named[1]}: {named[2]}" if named else f"augment: {_first_line(error)}"]
    return []
