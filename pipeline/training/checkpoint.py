"""Checkpoint directories: atomic writes, validation on load, and finding the newest valid one.

A checkpoint is a directory named ``checkpoint_step_<step>`` in the run folder
(``<train.storage_path>/<train.run_name>``) holding two files:

- ``state.pt``: ``torch.save`` of a plain dict (model, optimiser, scheduler, scaler, step, epoch, RNG
  states, preset, class map, params, tracking run id, the metrics not yet sent to MLflow), loaded with
  ``torch.load(weights_only=True)``;
- ``meta.json``: written after ``state.pt``: the step, the params and the sha256 and size of ``state.pt``.

Rank 0 writes both into a local temporary directory (each file: temporary name, fsync, rename) and hands
the directory to ``ray.train.report``, which copies it into storage and only then records it. A directory
whose ``meta.json`` is missing or whose ``state.pt`` does not match the recorded hash is a torn write (a
worker killed mid-copy) and is never used.

Keeping the newest ``train.keep_checkpoints``: Ray's ``CheckpointConfig(num_to_keep)`` deletes the
checkpoints it registered. A checkpoint can also reach storage without being registered (a worker dies
after the upload, before the controller takes the report; or a torn upload): the driver's ``prune``
deletes those when the run has finished, and never touches one that Ray's snapshot names.

Storage is a local path or a URL of ``pipeline.storage`` (``s3://`` through s3fs, or any fsspec URL); Ray
writes there through the same filesystem (``pipeline.storage.arrow_filesystem``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pipeline import storage
from pipeline.artifacts.atomic_write import write_bytes_atomic

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"
OUTCOME_FILE = "outcome.json"  # in the run folder: how the latest attempt ended (rank 0 writes it)
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # in the run folder: Ray Train V2's registered checkpoints
CHECKPOINT_FORMAT = "ssd-pipeline-checkpoint"
CHECKPOINT_VERSION = 1
_DIR_PATTERN = re.compile(r"^checkpoint_step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used (torn, foreign or unreadable); the message names it."""


class CheckpointMeta(NamedTuple):
    step: int
    epoch: int
    sha256: str
    size: int
    params: dict[str, Any]
    tracking_run_id: str | None
    world_size: int


class LoadedCheckpoint(NamedTuple):
    meta: CheckpointMeta
    state: dict[str, Any]
    uri: str  # where it was read from


def dir_name(step: int) -> str:
    """Checkpoint directory name for ``step`` completed optimiser steps (sorts by step as text too)."""
    return f"checkpoint_step_{step:09d}"


def step_of(name: str) -> int | None:
    """The step in a checkpoint directory name, or None for other names."""
    match = _DIR_PATTERN.match(name)
    return int(match.group(1)) if match else None


def write_checkpoint(
    directory: str | Path,
    state: dict[str, Any],
    meta: dict[str, Any],
    *,
    before_rename: Callable[[Path], None] | None = None,
) -> None:
    """Write ``state.pt`` then ``meta.json`` (with the state's sha256 and size) into local ``directory``.

    ``meta`` holds JSON values: ``step``, ``epoch``, ``params``, ``tracking_run_id``, ``world_size``.
    ``before_rename`` is a fault-injection hook, called once ``state.pt``'s temporary file is complete.
    """
    directory = Path(directory)
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(directory / STATE_FILE, data, before_rename=before_rename)
    full_meta = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        **meta,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    write_bytes_atomic(directory / META_FILE, json.dumps(full_meta, indent=1, sort_keys=True).encode())


def join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def read_meta(uri: str) -> CheckpointMeta:
    """Parse ``meta.json`` of the checkpoint directory at ``uri``.

    Raises:
        CheckpointError: missing, unparsable or of another format.
    """
    try:
        raw = json.loads(storage.read_bytes(join(uri, META_FILE)).decode())
    except (FileNotFoundError, OSError, ValueError) as error:
        raise CheckpointError(f"{uri}: no readable {META_FILE} ({error})") from error
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{uri}: {META_FILE} is not a {CHECKPOINT_FORMAT!r} file")
    if raw.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{uri}: checkpoint version {raw.get('version')!r}, this code reads {CHECKPOINT_VERSION}")
    try:
        return CheckpointMeta(
            step=int(raw["step"]),
            epoch=int(raw["epoch"]),
            sha256=str(raw["sha256"]),
            size=int(raw["size"]),
            params=dict(raw["params"]),
            tracking_run_id=raw.get("tracking_run_id"),
            world_size=int(raw["world_size"]),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{uri}: {META_FILE} lacks or mangles a field ({error!r})") from error


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Read and verify the checkpoint directory at ``uri`` (hash and size against ``meta.json``).

    Raises:
        CheckpointError: torn, foreign or unreadable; the message names the directory and the reason.
    """
    meta = read_meta(uri)
    try:
        data = storage.read_bytes(join(uri, STATE_FILE))
    except (FileNotFoundError, OSError) as error:
        raise CheckpointError(f"{uri}: {STATE_FILE} unreadable ({error})") from error
    if len(data) != meta.size or hashlib.sha256(data).hexdigest() != meta.sha256:
        raise CheckpointError(
            f"{uri}: {STATE_FILE} does not match {META_FILE} (size {len(data)}, expected {meta.size}): a torn write"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # same hash as written, yet unreadable: report which file and why
        raise CheckpointError(f"{uri}: {STATE_FILE} does not load ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or state.get("step") != meta.step:
        raise CheckpointError(f"{uri}: {STATE_FILE} is not the checkpoint {META_FILE} describes")
    return LoadedCheckpoint(meta, state, uri)


def list_checkpoints(run_uri: str) -> list[tuple[int, str]]:
    """``(step, uri)`` of every ``checkpoint_step_*`` directory in the run folder, newest first."""
    found = []
    for entry in storage.list_folder(run_uri):
        step = step_of(entry.name)
        if step is not None and entry.is_dir:
            found.append((step, join(run_uri, entry.name)))
    return sorted(found, reverse=True)


def find_latest_valid(run_uri: str) -> tuple[CheckpointMeta, str] | None:
    """The newest checkpoint in the run folder whose ``meta.json`` is readable and whose state matches it.

    Torn directories are logged and passed over. Reads each candidate's ``state.pt`` to check its hash.
    """
    for _, uri in list_checkpoints(run_uri):
        try:
            meta = read_meta(uri)
            sha256, size = storage.sha256_of(join(uri, STATE_FILE))
            if size != meta.size or sha256 != meta.sha256:
                raise CheckpointError(f"{uri}: {STATE_FILE} does not match {META_FILE}: a torn write")
        except (CheckpointError, FileNotFoundError, OSError) as error:
            logger.warning("ignoring checkpoint %s: %s", uri, error)
            continue
        return meta, uri
    return None


def write_outcome(run_uri: str, outcome: dict[str, Any]) -> None:
    """Record how a training attempt ended in ``<run folder>/outcome.json`` (Ray's result carries only the
    metrics of the newest checkpoint, not those of a final report without one).

    A local run folder gets the file atomically; an object store gets it as one object, visible only once
    complete (``storage.put_bytes``)."""
    storage.put_bytes(join(run_uri, OUTCOME_FILE), json.dumps(outcome, sort_keys=True).encode())


def read_outcome(run_uri: str) -> dict[str, Any] | None:
    """The run folder's ``outcome.json``, or None when it is missing or unreadable."""
    try:
        value = json.loads(storage.read_bytes(join(run_uri, OUTCOME_FILE)).decode())
    except (FileNotFoundError, OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def registered_names(run_uri: str) -> set[str] | None:
    """Checkpoint directory names that Ray's snapshot in the run folder records; None when there is no
    snapshot or it cannot be read (Ray rewrites it in place, so a read can catch it half-written)."""
    try:
        state = json.loads(storage.read_bytes(join(run_uri, SNAPSHOT_FILE)).decode())
        names = {r["checkpoint_dir_name"] for r in state["checkpoint_results"]}
        latest = state.get("latest_checkpoint_result")
        return names | ({latest["checkpoint_dir_name"]} if latest else set())
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def prune(run_uri: str, *, protect: frozenset[str] = frozenset()) -> list[str]:
    """Delete the checkpoint directories Ray's snapshot does not name (nor ``protect``); returns their URIs.

    Only call it when Ray is done with the run folder (after ``fit()`` returned): while a run is going,
    Ray rewrites the snapshot before it deletes a checkpoint it dropped, so a concurrent prune could delete
    that one first and make Ray's own deletion fail. Without a readable snapshot nothing is deleted.
    """
    registered = registered_names(run_uri)
    if not registered:
        return []
    deleted = []
    for _, uri in list_checkpoints(run_uri):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        if name in registered or name in protect:
            continue
        try:
            storage.delete_tree(uri)
        except (FileNotFoundError, OSError) as error:
            logger.warning("could not delete the stale checkpoint %s: %s", uri, error)
            continue
        deleted.append(uri)
        logger.info("deleted %s: a checkpoint Ray never registered (torn, or its report was lost in a fault)", uri)
    return deleted
