"""Fine-tuning: start a run from an earlier detector (``model.init_from``), its class rows matched by name.

The source is a model file (``models/ssd.pt``, ``pipeline.artifacts.model_file``) or a checkpoint folder
(``checkpoint_step_N``, ``pipeline.training.checkpoint``), local or at a storage URL, or a registered MLflow
model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), of the same preset. Every tensor of the fresh model
is taken from the source when the source has it with the same shape. The classification heads ``conf.k`` are
the exception: their output channels are ``[A, C]`` (boxes per location x classes, background first), so
their rows are copied class by class, by *name*: background from background, a class the source knows from
that class's rows, a new class keeps its fresh initialisation. A head whose boxes per location differ (other
priors) is re-initialised whole.

``transfer_weights`` returns one ``TransferRow`` per tensor; ``transfer_table`` prints them for the log.
The source file's sha256 (``InitSource.sha256``, ``source_digest``) joins the run identity, so a changed
source starts a new run folder rather than resuming one trained from another start, and a worker refuses a
source whose sha256 is not the one the identity names.

A registered model is resolved on the driver to the version its alias points at then (``models:/NAME/VERSION``,
what the workers are given), and every reader downloads that version's model file from the tracking store
(``Registry``: the job's store and credentials) into a temporary folder: no disk shared between the driver and
the workers is needed, and an alias that moves later is another source, hence another run.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from pipeline import storage
from pipeline.artifacts.model_file import load_model_file
from pipeline.config import TrackingConfig
from pipeline.serving.model_uri import download_registered, is_model_uri
from pipeline.tracking.uris import TrackingError
from pipeline.training import checkpoint
from ssd_core.model import SSD

_CONF = re.compile(r"^conf\.\d+\.(weight|bias)$")
LOADED, CLASS_ROWS, REINITIALISED, SKIPPED = "loaded", "class rows", "re-initialised", "skipped"


class InitSource(NamedTuple):
    """What a run starts from."""

    uri: str  # a registered model's as models:/NAME/VERSION, the version its alias pointed at
    kind: str  # "model file" | "checkpoint" | "registered model"
    preset: str
    classes: list[str]  # label i + 1 is classes[i]
    prior_spec: dict[str, Any] | None  # PriorSpec.to_dict() of the source (None: not recorded)
    state_dict: dict[str, Tensor]
    sha256: str  # of the weights file (source_digest): the run identity's


class Registry(NamedTuple):
    """The tracking store a ``models:/`` source is downloaded from: the job's ``params.tracking``, the repository
    root (the default store lives there) and the store's credentials (``TrainJob.tracking_credentials``; on the
    driver MLflow's variables of the process serve as well)."""

    tracking: TrackingConfig
    repo_root: str
    credentials: Mapping[str, str] | None = None


class TransferRow(NamedTuple):
    name: str  # tensor name in this model (or in the source, for tensors this model lacks)
    action: str  # LOADED | CLASS_ROWS | REINITIALISED | SKIPPED
    detail: str


def is_checkpoint(uri: str) -> bool:
    """A checkpoint folder (holds ``state.pt``) rather than a model file."""
    return storage.exists(checkpoint.join(uri, checkpoint.STATE_FILE))


def read_source(uri: str, registry: Registry | None = None, *, expect_sha256: str = "") -> InitSource:
    """Load and check the source at ``uri`` (its sha256 and format checked): a model file or checkpoint folder, or
    a registered model downloaded from ``registry``'s store (needed for ``models:/`` URIs).

    ``expect_sha256``: the digest the run identity names (``TrainJob.init_digest``); a source with other weights
    (the file was replaced, the version re-created) is refused rather than trained from.

    Raises:
        ValueError: ``model.init_from`` names no usable model file, checkpoint folder or registered model (what
            and why: the URI of an unknown model, alias or version named), or other weights than expected.
    """
    source = _read_registered(uri, registry) if is_model_uri(uri) else _read_stored(uri)
    if expect_sha256 and source.sha256 != expect_sha256:
        raise ValueError(
            f"model.init_from: {storage.describe(source.uri)} holds other weights (sha256 {source.sha256[:12]}) "
            f"than this run started from ({expect_sha256[:12]}); it changed after the job was submitted"
        )
    return source


def _read_stored(uri: str) -> InitSource:
    """A model file or checkpoint folder, local or at a storage URL."""
    try:
        if is_checkpoint(uri):
            loaded = checkpoint.load_checkpoint(uri)
            state = loaded.state
            return InitSource(
                uri,
                "checkpoint",
                state["preset"],
                list(state["classes"]),
                state.get("prior_spec"),
                state["model"],
                loaded.meta.sha256,  # load_checkpoint checked state.pt against it
            )
        model = load_model_file(uri)
    except FileNotFoundError as error:
        raise ValueError(f"model.init_from: no model file or checkpoint folder at {uri} ({error})") from None
    except (checkpoint.CheckpointError, ValueError) as error:
        raise ValueError(f"model.init_from: {error}") from None
    spec = model.model.prior_spec.to_dict()
    return InitSource(
        uri, "model file", model.preset, model.classes, spec, model.model.state_dict(), source_digest(uri)
    )


def _read_registered(uri: str, registry: Registry | None) -> InitSource:
    """The model file of registered model ``uri``, downloaded into a temporary folder that is removed once it is
    read; the source's ``uri`` is the version it is (``models:/NAME/VERSION``)."""
    if registry is None:
        raise ValueError(f"model.init_from: {uri}: a registered model needs the tracking store to read it from")
    with tempfile.TemporaryDirectory(prefix="ssd-init-from-") as scratch:
        try:
            found = download_registered(
                uri,
                registry.tracking,
                registry.repo_root,
                credentials=registry.credentials,
                key="model.init_from:",
                into=Path(scratch),
            )
        except TrackingError as error:  # an unknown model, alias or version: bad input, refused before training
            text = str(error)  # the store's answer names the URI; an unreachable store's names the server
            raise ValueError(
                text if text.startswith("model.init_from") else f"model.init_from: {uri}: {text}"
            ) from None
        source = _read_stored(str(found.path))
    return source._replace(uri=found.pinned_uri, kind="registered model")


def source_digest(uri: str) -> str:
    """sha256 of the source's weights file (a checkpoint's ``state.pt``, or the model file)."""
    target = checkpoint.join(uri, checkpoint.STATE_FILE) if is_checkpoint(uri) else uri
    return storage.sha256_of(target)[0]


def transfer_weights(model: SSD, source: InitSource, classes: Sequence[str]) -> list[TransferRow]:
    """Load ``source``'s tensors into ``model`` (built for ``classes``), class rows by name; one row per tensor.

    Raises:
        ValueError: the source is of another preset (the layer names would mean other layers).
    """
    if source.preset != model.preset:
        raise ValueError(f"model.init_from: {source.uri} is a {source.preset} model, this run trains {model.preset}")
    if len(classes) + 1 != model.num_classes:
        raise ValueError(f"transfer_weights: {len(classes)} class names for a model of {model.num_classes} classes")
    # target label -> source label (0: background; None: a class the source does not know)
    index = {name: i + 1 for i, name in enumerate(source.classes)}
    label_map = [0, *(index.get(name) for name in classes)]
    target = model.state_dict()
    rows, merged = [], {}
    for name, fresh in target.items():
        old = source.state_dict.get(name)
        if old is None:
            rows.append(TransferRow(name, REINITIALISED, "not in the source"))
        elif _CONF.match(name) and old.shape[1:] == fresh.shape[1:]:
            rows.append(_class_rows(name, fresh, old, label_map, len(source.classes) + 1, classes, merged))
        elif old.shape == fresh.shape:
            merged[name] = old.to(fresh.dtype)
            rows.append(TransferRow(name, LOADED, f"{list(fresh.shape)}"))
        else:
            rows.append(TransferRow(name, REINITIALISED, f"source shape {list(old.shape)}, here {list(fresh.shape)}"))
    rows += [TransferRow(name, SKIPPED, "not in this model") for name in source.state_dict if name not in target]
    model.load_state_dict({**target, **merged})
    return rows


def _class_rows(
    name: str,
    fresh: Tensor,
    old: Tensor,
    label_map: list[int | None],
    source_classes: int,
    classes: Sequence[str],
    merged: dict[str, Tensor],
) -> TransferRow:
    """A ``conf`` head tensor ``[A * C, ...]``: rows of matched classes copied, the others left fresh."""
    here = len(label_map)
    boxes, rest = fresh.shape[0] // here, fresh.shape[1:]
    if old.shape[0] % source_classes or old.shape[0] // source_classes != boxes:
        return TransferRow(name, REINITIALISED, f"source has {old.shape[0] // source_classes} boxes per location")
    new = fresh.clone().reshape(boxes, here, *rest)  # [A, C, ...]
    src = old.to(fresh.dtype).reshape(boxes, source_classes, *rest)  # [A, C_source, ...]
    matched = [(t, s) for t, s in enumerate(label_map) if s is not None]
    for t, s in matched:
        new[:, t] = src[:, s]
    merged[name] = new.reshape(fresh.shape)
    fresh_names = [classes[t - 1] for t, s in enumerate(label_map) if s is None]
    return TransferRow(
        name, CLASS_ROWS, f"background + {len(matched) - 1} of {here - 1} classes by name; new: {fresh_names or 'none'}"
    )


def transfer_table(rows: Sequence[TransferRow], source: InitSource) -> str:
    """The rows as a text table with a one-line count first."""
    counts = {
        action: sum(row.action == action for row in rows) for action in (LOADED, CLASS_ROWS, REINITIALISED, SKIPPED)
    }
    head = f"init_from {source.kind} {storage.describe(source.uri)}: " + ", ".join(
        f"{v} {k}" for k, v in counts.items()
    )
    width = max((len(row.name) for row in rows), default=4)
    return "\n".join([head, *(f"  {row.name:<{width}}  {row.action:<14}  {row.detail}" for row in rows)])
