"""The trained-model file (``models/ssd.pt``): weights, preset, priors, class map and the training params.

The file is ``torch.save`` of a plain dict of tensors, strings, numbers and lists, so it loads with
``torch.load(weights_only=True)`` anywhere, without Ray, MLflow or this package's training code::

    {"format": "ssd-pipeline-model", "version": 2, "preset": "ssd_tiny", "num_classes": 4,
     "classes": ["circle", "square", "triangle"], "prior_spec": {"image_size": 160, ...},
     "state_dict": {...}, "params": {...}}

``classes[i]`` is the name of label ``i + 1``; label 0 is background, so ``num_classes == len(classes) + 1``.
``prior_spec`` is the full ``PriorSpec.to_dict()`` the model was built with; loading rebuilds exactly those
priors, never the preset's or ``params``'s idea of them.

Version 1 files (no ``prior_spec``) were written by code that always built the preset's own priors
(``ssd_core.model.PRESET_PRIORS``: VOC boxes for the VGG presets, whatever ``model.priors`` said), so that
is what their weights were trained with and what they load with.

The file may live in a local folder or at a ``pipeline.storage`` URL (``s3://bucket/models/ssd.pt``).
"""

from __future__ import annotations

import io
import reprlib
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline import storage
from ssd_core.model import PRESET_PRIORS, PRESETS, SSD, build_ssd
from ssd_core.priors import PriorSpec

MODEL_FORMAT = "ssd-pipeline-model"
MODEL_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: before prior_spec was recorded (see the module docstring)
MAX_CLASSES = 10_000  # far above any detection set (LVIS: 1,203); a longer list is not a class map
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 6, 60, 60


class LoadedModel(NamedTuple):
    model: SSD  # in eval mode
    classes: list[str]  # label i + 1 is classes[i]
    params: dict[str, Any]  # params_to_dict(Params) of the training run
    preset: str
    prior_spec: PriorSpec  # the priors the model was built with (also ``model.prior_spec``)


def save_model_file(path: str | Path, model: SSD, *, classes: list[str], params: dict[str, Any]) -> None:
    """Write ``model`` with its class map and training params to ``path`` (a local path or a URL), atomically.

    Unwrap DDP before calling (``model.module``). The file appears complete or not at all: locally the bytes
    go to a temporary file in the same folder, which is fsynced and then renamed over ``path``; an object
    store gets them as one object (``storage.put_bytes``).

    Raises:
        TypeError: ``model`` is not an ``SSD`` (e.g. still wrapped in DistributedDataParallel).
        ValueError: ``len(classes) + 1 != model.num_classes``.
    """
    if not isinstance(model, SSD):
        raise TypeError(f"save_model_file: expected an SSD model (unwrapped), got {type(model).__name__}")
    classes = [str(name) for name in classes]
    if len(classes) + 1 != model.num_classes:
        raise ValueError(
            f"save_model_file: the model has {model.num_classes} classes including background, so it needs "
            f"{model.num_classes - 1} class names; got {len(classes)}: {classes}"
        )
    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "preset": model.preset,
        "num_classes": model.num_classes,
        "classes": classes,
        "prior_spec": model.prior_spec.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "params": params,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.put_bytes(path, buffer.getvalue())


def load_model_file(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Read a file written by ``save_model_file`` (local path or URL); the model comes back in eval mode on
    ``map_location``.

    A model file is input: nothing is built from it before it is checked. The fields are validated first
    (``check_payload``), then the model is built on PyTorch's ``meta`` device (shapes only, no memory) and
    every tensor of the file is compared with it (``check_state_dict``); only a file that matches is built
    for real, so a few bytes claiming a million classes cannot make this allocate gigabytes.

    Raises:
        FileNotFoundError: no file at ``path``.
        pipeline.storage.StorageError: ``path`` is a URL with credentials in it, or of an unknown protocol.
        ValueError: the file is not a model file of this format, a field is malformed, or a weight is
            missing, unexpected or of another shape than its preset and class count need (key named).
    """
    source: Any = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
    path = Path(path) if not storage.is_url(path) else storage.describe(str(path))
    try:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # a torn or foreign file: say which file, keep the cause
        raise ValueError(f"{path}: not a readable model file ({type(error).__name__}: {error})") from error
    check_payload(payload, path)
    preset, num_classes = payload["preset"], payload["num_classes"]
    spec = recorded_prior_spec(payload, path)
    try:
        with torch.device("meta"):
            skeleton = build_ssd(preset, num_classes, prior_spec=spec)
    except ValueError as error:
        raise ValueError(f"{path}: prior_spec does not fit preset {preset!r}: {error}") from error
    check_state_dict(payload["state_dict"], skeleton.state_dict(), f"{path} (preset {preset!r}, {num_classes} classes)")
    model = build_ssd(preset, num_classes, prior_spec=spec)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:  # shapes agree (checked above); what is left, e.g. an uncastable dtype
        raise ValueError(f"{path}: the weights do not fit preset {preset!r}: {error}") from error
    model.to(map_location).eval()
    return LoadedModel(model, list(payload["classes"]), dict(payload["params"]), preset, spec)


def recorded_prior_spec(payload: dict[str, Any], path: Path | str) -> PriorSpec:
    """The priors a checked payload records (version 1: the preset's own, which its code always built).

    Raises:
        ValueError: naming ``path``: ``prior_spec`` is malformed.
    """
    if payload["version"] == 1:
        return PRESET_PRIORS[payload["preset"]]
    try:
        return PriorSpec.from_dict(payload.get("prior_spec"))
    except ValueError as error:
        raise ValueError(f"{path}: prior_spec: {str(error)[:300]}") from None


def check_payload(payload: Any, path: Path | str) -> None:
    """Check what ``torch.load`` gave against the format in the module docstring (all but the tensor shapes).

    Raises:
        ValueError: naming ``path``, the field, what was expected and what the file holds.
    """
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: expected a {MODEL_FORMAT!r} file, found {found!r}")
    if payload.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: model file version {payload.get('version')!r}, this code reads {READABLE_VERSIONS}")
    preset = payload.get("preset")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"{path}: preset: expected one of {PRESETS}, got {_short(preset)}")
    classes = payload.get("classes")
    if not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES:
        got = f"{len(classes)} names" if isinstance(classes, list) else _short(classes)
        raise ValueError(f"{path}: classes: expected a list of 1..{MAX_CLASSES} names, got {got}")
    for i, name in enumerate(classes):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}: classes[{i}]: expected a non-empty string, got {_short(name)}")
    if len(set(classes)) != len(classes):
        repeated = sorted({name for name in classes if classes.count(name) > 1})
        raise ValueError(f"{path}: classes: expected unique names, got {_short(repeated)} more than once")
    num_classes = payload.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes != len(classes) + 1:
        raise ValueError(
            f"{path}: num_classes: expected len(classes) + 1 = {len(classes) + 1} (background "
            f"included), got {_short(num_classes)}"
        )
    params = payload.get("params")
    if not isinstance(params, dict) or not all(isinstance(key, str) for key in params):
        raise ValueError(
            f"{path}: params: expected a dict with string keys (the training params), got {type(params).__name__}"
        )
    state = payload.get("state_dict")
    tensors = isinstance(state, dict) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    )
    if not tensors:
        raise ValueError(f"{path}: state_dict: expected a dict of name -> tensor, got {type(state).__name__}")


def check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Every key of ``expected`` (the built model's state dict, e.g. on the meta device) must be in ``state``
    with the same shape, and ``state`` must hold nothing else.

    Raises:
        ValueError: naming ``where``, the key, the expected and the found shape (or the missing/unexpected keys).
    """
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{where}: the weights do not fit: missing keys {_short(missing)}, unexpected keys {_short(unexpected)}"
        )
    for key, want in expected.items():
        if state[key].shape != want.shape:
            raise ValueError(
                f"{where}: weight {key!r}: expected shape {list(want.shape)}, got {list(state[key].shape)}"
            )


def _short(value: Any) -> str:
    """A bounded ``repr`` for errors about a hostile file (long lists and strings abbreviated)."""
    return _REPR.repr(value)
