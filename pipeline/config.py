"""Typed, validated parameters: ``params.yaml`` + command-line dotlist overrides -> ``Params``.

``params.yaml`` is the one source of values. It is merged over the dataclass schema
(``pipeline.config_schema``, every name re-exported here) with OmegaConf, so that an unknown key, a wrong
type or an out-of-range value fails before any work starts, with a message that names the full key path
and what is allowed::

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
import os
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.config_schema import (
    MAX_BATCH,
    MAX_GRAD_STATS_STEPS,
    MAX_IMAGES,
    MAX_PROCESSES,
    MAX_STEPS,
    MAX_WORKERS,
    RUN_NAME_PATTERN,
    SEED_MAX,
    SELECT_METRICS,
    AugmentConfig,
    BoxesConfig,
    CocoConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    Params,
    PrepareConfig,
    PriorSpecConfig,
    ShardConfig,
    SyntheticConfig,
    TrackingConfig,
    TrainConfig,
    VocConfig,
)

__all__ = [
    "MAX_BATCH",
    "MAX_GRAD_STATS_STEPS",
    "MAX_IMAGES",
    "MAX_PROCESSES",
    "MAX_STEPS",
    "MAX_WORKERS",
    "RUN_NAME_PATTERN",
    "SEED_MAX",
    "SELECT_METRICS",
    "AugmentConfig",
    "BoxesConfig",
    "CocoConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "Params",
    "PrepareConfig",
    "PriorSpecConfig",
    "ShardConfig",
    "SyntheticConfig",
    "TrackingConfig",
    "TrainConfig",
    "VocConfig",
    "flatten",
    "load_params",
    "params_from_dict",
    "params_to_dict",
]


class ConfigError(ValueError):
    """A parameter file or override that does not fit the schema; the message names the key path."""


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
    if not any(problem.startswith("model.") for problem in problems):
        from pipeline.model_builder import freeze_problems, model_problems  # imports torch: only when validating

        problems += model_problems(params.model) or freeze_problems(params.model, params.train)
    if not any(problem.startswith("train.") for problem in problems):
        problems += list(selection_problems(params.train))
        problems += [p for p in (grad_stats_problem(params),) if p]
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
    """Per field: floats finite, then the choices, pattern and bounds ``config_schema._p`` gave every field."""
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
    if isinstance(node, TrainConfig):
        problem = _workers_problem(node.num_workers)
        if problem:
            yield f"{prefix}num_workers: {problem}"


def _workers_problem(value: Any) -> str | None:
    """Why ``train.num_workers`` is neither a number of workers nor an elastic ``[min, max]``, or None."""
    if isinstance(value, bool) or not isinstance(value, int | list):
        return f"expected a number of workers or [min, max], got {value!r}"
    bounds = [value] if isinstance(value, int) else value
    if isinstance(value, list) and (len(value) != 2 or not all(type(v) is int for v in value)):
        return f"expected a number of workers or [min, max] (two integers), got {value!r}"
    if not all(1 <= v <= MAX_WORKERS for v in bounds):
        return f"must be in 1..{MAX_WORKERS}, got {value!r}"
    if isinstance(value, list) and value[0] > value[1]:
        return f"expected [min, max] with min <= max, got {value!r}"
    return None


def _section_problems(params: Params) -> Iterable[str]:
    """Rules between the values of one list or section: class names, the multistep schedule."""
    classes = params.data.classes
    repeated = sorted({name for name in classes if classes.count(name) > 1})
    if repeated:
        yield f"data.classes: expected distinct names, got {repeated} more than once"
    if "" in [name.strip() for name in classes]:
        yield f"data.classes: expected non-empty names, got {classes}"
    problem = milestones_problem(params.train)
    if problem:
        yield problem
    if params.train.cuda_graphs and not (params.train.compile and params.train.use_gpu):
        yield "train.cuda_graphs: needs train.compile: true and train.use_gpu: true (CUDA graphs exist only on CUDA)"
    train = params.train
    if _workers_problem(train.num_workers) is None and train.batch_size < train.worker_range[1]:
        yield (
            f"train.batch_size: the global batch of {train.batch_size} images cannot give each of up to "
            f"{train.worker_range[1]} workers (train.num_workers) an image; use at least {train.worker_range[1]}"
        )
    yield from _tracked_problems(params.data)


def _tracked_problems(data: DataConfig) -> Iterable[str]:
    """Every input prepare reads must lie inside ``data.tracked`` (when set), or DVC would not see it change."""
    if not data.tracked or data.source == "synthetic":
        return
    coco = data.coco
    inputs = (
        data.roots if data.source == "voc" else [coco.train_json, coco.train_images, coco.val_json, coco.val_images]
    )
    outside = [path for path in inputs if path and not _inside(path, data.tracked)]
    if outside:
        yield (
            f"data.tracked: prepare reads {outside}, outside data.tracked {data.tracked!r}, so DVC would not see "
            f"them change; set data.tracked to the folder that holds the raw data (or '' when not using DVC)"
        )


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it (local paths relative to the working directory, or URLs)."""
    if "://" in path or "://" in folder:
        return (path.rstrip("/") + "/").startswith(folder.rstrip("/") + "/")
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def selection_problems(train: TrainConfig) -> Iterable[str]:
    """Keys that ask for what the others switch off: best weights or patience without validation, EMA weights
    without an EMA."""
    if train.final_weights == "best" and not train.val_every_steps:
        yield "train.final_weights: 'best' needs validation (train.val_every_steps > 0), got val_every_steps=0"
    if train.final_weights == "ema" and not train.ema_decay:
        yield "train.final_weights: 'ema' needs an EMA (train.ema_decay > 0), got ema_decay=0"
    if train.patience and not train.val_every_steps:
        yield f"train.patience: {train.patience} needs validation (train.val_every_steps > 0), got val_every_steps=0"


def grad_stats_problem(params: Params) -> str | None:
    """Why a tracked run would record too many steps of gradient statistics, or None: the table, the heatmap
    and every checkpoint hold all of them (``pipeline.training.grad_stats``)."""
    every, steps = params.tracking.grad_stats_every, params.train.max_steps
    if params.tracking.enabled and every and steps // every > MAX_GRAD_STATS_STEPS:
        return (
            f"tracking.grad_stats_every: {every} with train.max_steps={steps} records {steps // every} steps of "
            f"per-layer statistics, at most {MAX_GRAD_STATS_STEPS} (set it >= {-(-steps // MAX_GRAD_STATS_STEPS)}, "
            "or 0 for off)"
        )
    return None


def milestones_problem(train: TrainConfig) -> str | None:
    """Why ``train.milestones`` cannot be a schedule's decay steps, or None: strictly increasing, in 1..last.

    The schedule counts steps 1..max_steps; under cosine the milestones are unused, so only their form counts.
    """
    milestones = list(train.milestones)
    last = train.max_steps if train.schedule == "multistep" else MAX_STEPS
    if milestones != sorted(set(milestones)) or any(not 0 < m <= last for m in milestones):
        return f"train.milestones: expected strictly increasing steps in 1..{last}, got {milestones}"
    return None


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
