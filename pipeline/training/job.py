"""What the driver hands to every worker: the resolved params and absolute locations, nothing to re-read.

Ray workers run in their own working directory (and on other machines), so every path in a ``TrainJob``
is absolute or a URL, and the params are the validated ``Params`` object itself.

Secrets: ``params.tracking.uri`` carries no credentials (``tracking.detach_credentials``); the tracking
server's credentials travel in ``tracking_credentials``, which no checkpoint, log line or repr contains.
A storage or shard URL may carry credentials where it is used (``s3://key:secret@bucket``): the repr of a
job, which Ray records as part of the run's config, shows every URI through ``tracking.redact_uri``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pipeline
from pipeline.config import Params, flatten, params_to_dict
from pipeline.tracking import redact_uri
from pipeline.training.code_closure import import_closure

# Params that change how a run is executed but not what it computes: a run may resume under other values.
# Everything else under seed, model, augment and train is the run's identity (see ``identity_digest``).
OPERATIONAL_TRAIN_KEYS = frozenset(
    {
        "num_workers",
        "threads_per_worker",
        "use_gpu",
        "compile",
        "cuda_graphs",
        "loader_workers",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "max_failures",
        "max_consecutive_skips",
        "resume",
        "run_name",
        "storage_path",
        "log_every_steps",
        "final_weights",  # every checkpoint holds the last, EMA and best weights: only the copy out differs
    }
)
IDENTITY_SECTIONS = ("seed", "model", "augment", "train")
# With validation on, the post-processing that scores it picks the best step and decides early stopping.
VALIDATION_EVAL_KEYS = ("eval.score_threshold", "eval.nms_iou", "eval.top_k", "eval.max_detections")
# The code that decides what a run computes (model, loss, matching, augmentation, data order, loop, optimiser):
# every project file that importing the worker's loop runs, so a new module is never left out of the digest.
# ``TRAINING_CODE`` (module attribute) is that closure, worked out on first use: the driver needs it for the
# run identity, while every Ray worker imports this module and never does.
TRAINING_ENTRY = "pipeline/training/loop.py"


@functools.cache
def _training_code() -> tuple[str, ...]:
    return import_closure([TRAINING_ENTRY], Path(pipeline.__file__).resolve().parent.parent)


def __getattr__(name: str) -> Any:
    if name == "TRAINING_CODE":
        return _training_code()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True, repr=False)
class TrainJob:
    params: Params  # validated; tracking.uri (without credentials) and train.storage_path already absolute
    shards: str  # absolute folder or URL holding manifest.json
    classes: tuple[str, ...]  # from the shard manifest; label i + 1 is classes[i]
    run_uri: str  # <storage>/<run folder>: Ray's RunConfig(storage_path, name) joined
    repo_root: str  # absolute; MLflow's default store and the git commit live here
    data_digest: str  # sha256 of the shard manifest
    tracking_run_id: str | None = None  # MLflow run to continue (from that checkpoint, or made by the driver)
    invocation: str = ""  # unique per driver invocation: tells this attempt's outcome.json from an older one
    init_digest: str = ""  # sha256 of the model.init_from source the run identity names; checked where it is read
    # MLflow's credential variables (tracking.CREDENTIAL_VARS) for rank 0's tracker; never recorded or shown
    tracking_credentials: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return redact_uri(f"{type(self).__name__}({shown})")

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1


def code_digest() -> str:
    """sha256 over the sources that decide what training computes: the files of ``TRAINING_CODE`` in their
    sorted order, each as its posix path then its bytes (DVC's train stage lists this code in its ``deps``)."""
    root = Path(pipeline.__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for entry in _training_code():
        digest.update(entry.encode())
        digest.update((root / entry).read_bytes())
    return digest.hexdigest()


def identity(params: Params, data_digest: str, code: str, init_digest: str = "") -> dict[str, Any]:
    """What a run computes: the flattened params that matter (with validation on, the eval keys that score it),
    the data digest, the code digest and, when fine-tuning, the sha256 of the ``model.init_from`` source (its
    path alone could hold other weights later)."""
    flat = flatten({k: v for k, v in params_to_dict(params).items() if k in IDENTITY_SECTIONS})
    kept = {
        k: v for k, v in flat.items() if not (k.startswith("train.") and k.split(".", 1)[1] in OPERATIONAL_TRAIN_KEYS)
    }
    if params.train.val_every_steps:
        evaluation = flatten({"eval": params_to_dict(params)["eval"]})
        kept.update({k: evaluation[k] for k in VALIDATION_EVAL_KEYS})
    source = {"model.init_from_sha256": init_digest} if init_digest else {}
    return {**kept, **source, "data.manifest_sha256": data_digest, "code.sha256": code}


def identity_digest(params: Params, data_digest: str, code: str | None = None, init_digest: str = "") -> str:
    """8 hex digits naming a run's identity; the run folder is ``<train.run_name>-<digest>``.

    ``code`` defaults to ``code_digest()``: changed training code starts a new run, as DVC re-runs the stage.
    """
    code = code_digest() if code is None else code
    text = json.dumps(identity(params, data_digest, code, init_digest), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]
