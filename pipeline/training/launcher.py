"""Driver side of training: join or start Ray, prepare the run folder, run the ``TorchTrainer``.

Resuming. The run folder is ``<train.storage_path>/<train.run_name>-<identity digest>`` (``job.identity``):
the same command with the same training params, data and code always lands in the same folder, and a
change to any of them in a new one, so a changed learning rate never continues an old run by accident
(``train.num_workers`` and the other keys of ``job.OPERATIONAL_TRAIN_KEYS`` are not part of the identity:
a run may resume on more or fewer workers and continues the same global batches). In that
folder Ray Train V2 keeps ``checkpoint_manager_snapshot.json`` and restores its newest checkpoint into
``ray.train.get_checkpoint()`` on its own, both after a worker failure inside one ``fit()`` and when the
whole command is run again. On top of that the driver

- moves an unusable snapshot aside (unparsable, from another Ray version, or naming a deleted
  checkpoint), which would otherwise make Ray refuse to start;
- finds the newest *valid* checkpoint itself (hash-checked, see ``checkpoint.find_latest_valid``) to
  report where the run resumes and which MLflow run it continues. The workers do the same at every
  (re)start and take the newest checkpoint that loads, whether Ray registered it or not (a worker can
  die after its checkpoint reached storage but before the controller took the report);
- with ``train.resume=false`` moves an existing run folder aside (``<folder>.replaced-<UTC time>``) so the
  run starts from scratch and nothing is deleted.

Elastic runs: ``train.num_workers: [min, max]`` becomes ``ScalingConfig(num_workers=(min, max))``; Ray Train
then starts as many workers as the cluster can place, restarts the group from the newest checkpoint when a
node is lost (on fewer workers, down to ``min``) or when more resources appear, and the workers read the
world size from their context. Stopping: ``fit()`` runs under ``preemption.fit_until_signalled``, so a
SIGTERM / SIGINT ends the run after the current step with a checkpoint (``TrainingStopped``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, NamedTuple

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline import storage
from pipeline.config import TrainConfig
from pipeline.tracking import redact_uri
from pipeline.training import checkpoint, faults, ray_runtime
from pipeline.training.checkpoint import SNAPSHOT_FILE
from pipeline.training.job import TrainJob
from pipeline.training.loop import (
    STATUS_COMPLETED,
    STATUS_NONFINITE,
    STATUS_STOPPED,
    STATUS_STOPPED_EARLY,
    train_loop_per_worker,
)
from pipeline.training.preemption import fit_until_signalled, start_stop_requests

logger = logging.getLogger(__name__)

DEFAULT_PROCESS_GROUP_TIMEOUT_S = 1800  # torch.distributed collective timeout (Ray's default)


class TrainingError(RuntimeError):
    """The run stopped without finishing (too many non-finite steps, or failures beyond max_failures)."""


class TrainingStopped(TrainingError):
    """A signal stopped the run after a step, which was checkpointed; the same command resumes there."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class TrainOutcome(NamedTuple):
    checkpoint_uri: str  # the final checkpoint (step train.max_steps, or where patience stopped the run)
    metrics: dict[str, Any]  # outcome.json: status, step, skipped_steps, bad_samples...


# ------------------------------------------------------------------------------------------------ Ray
def connect_ray(cfg: TrainConfig) -> bool:
    """Attach to Ray (``pipeline.training.ray_runtime.connect_ray``): an initialised one, ``RAY_ADDRESS``'s
    cluster, or a new local one on 127.0.0.1 with at least the CPUs the workers ask for (most workers x
    ``threads_per_worker``), so that the trainer can always be scheduled.

    Returns True when this call connected (the caller then calls ``ray.shutdown()`` at the end).
    """
    needed = cfg.worker_range[1] * cfg.threads_per_worker
    cores = os.cpu_count() or 1
    if needed > cores and not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        logger.warning(
            "train: %d workers x %d threads = %d CPUs requested on a %d-core machine (oversubscribed)",
            cfg.worker_range[1],
            cfg.threads_per_worker,
            needed,
            cores,
        )
    # The dashboard serves the State API that Ray Train V2's placement-group cleaner polls; without it
    # the cleaner logs a warning every second and cannot clean up after a crashed controller.
    return ray_runtime.connect_ray(cpus_needed=needed, dashboard=True, purpose="train")


# ------------------------------------------------------------------------------------------ run folder
def prepare_run_folder(run_uri: str, *, resume: bool) -> tuple[checkpoint.CheckpointMeta, str] | None:
    """Make the run folder usable and return its newest valid checkpoint ``(meta, uri)``, if resuming."""
    if not storage.exists(run_uri):
        return None
    if not resume:
        _move_aside(run_uri, "replaced")
        return None
    _check_snapshot(run_uri)
    return checkpoint.find_latest_valid(run_uri)


def _move_aside(uri: str, reason: str) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        storage.move(uri, f"{uri}.{reason}-{stamp}")
    except (OSError, NotImplementedError) as error:
        raise TrainingError(
            redact_uri(
                f"{uri}: cannot move it aside on this storage ({error}); delete it or choose another train.run_name"
            )
        ) from error
    logger.warning("moved %s aside to %s", redact_uri(uri), redact_uri(f"{uri}.{reason}-{stamp}"))


def _check_snapshot(run_uri: str) -> None:
    """Move Ray's checkpoint snapshot aside when Ray could not load it (it would refuse to start)."""
    snapshot = checkpoint.join(run_uri, SNAPSHOT_FILE)
    if not storage.exists(snapshot):
        return
    problem = None
    try:
        state = json.loads(storage.read_bytes(snapshot).decode())
        if state.get("ray_version") != ray.__version__:
            problem = f"written by Ray {state.get('ray_version')}, this is Ray {ray.__version__}"
        else:
            names = [r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])]
            latest = state.get("latest_checkpoint_result")
            names += [latest["checkpoint_dir_name"]] if latest else []
            missing = [n for n in names if not storage.exists(checkpoint.join(run_uri, n))]
            if missing:
                problem = f"names checkpoints that no longer exist: {missing}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        problem = f"unreadable ({type(error).__name__}: {error})"
    if problem:
        logger.warning(
            "Ray's checkpoint snapshot in %s is %s; resuming from the newest valid checkpoint instead",
            redact_uri(run_uri),
            redact_uri(problem),
        )
        _move_aside(snapshot, "invalid")


# ---------------------------------------------------------------------------------------------- trainer
def build_trainer(
    job: TrainJob, *, process_group_timeout_s: int = DEFAULT_PROCESS_GROUP_TIMEOUT_S, stop_requests: Any = None
) -> TorchTrainer:
    """The ``TorchTrainer`` of ``job``. Ray gets the storage as a filesystem and a path, never as a URL
    (``storage.arrow_filesystem``: the pipeline's own fsspec filesystem, wrapped for pyarrow). The workers'
    environment carries no credentials either (Ray logs runtime environments): the MLflow ones travel
    inside ``job``, the object store's come from each node's environment or AWS files.
    ``stop_requests``: the ``preemption.StopRequests`` actor the workers watch, or None."""
    cfg = job.params.train
    storage_root, name = job.run_uri.rstrip("/").rsplit("/", 1)
    filesystem, storage_path = storage.arrow_filesystem(storage_root)
    resources = {"CPU": cfg.threads_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    env = {faults.ENV_VAR: os.environ[faults.ENV_VAR]} if os.environ.get(faults.ENV_VAR) else {}
    low, high = cfg.worker_range
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "stop_requests": stop_requests},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo", timeout_s=process_group_timeout_s),
        scaling_config=ScalingConfig(
            num_workers=low if low == high else (low, high),  # a pair: Ray Train's elastic mode
            use_gpu=cfg.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )


def run_training(job: TrainJob, *, process_group_timeout_s: int = DEFAULT_PROCESS_GROUP_TIMEOUT_S) -> TrainOutcome:
    """Run ``fit()`` and return the final checkpoint; Ray must be connected (``connect_ray``).

    Raises:
        TrainingStopped: a SIGTERM / SIGINT stopped the run after a step, checkpointed.
        TrainingError: non-finite steps beyond ``train.max_consecutive_skips`` (the last good checkpoint
            is kept), or worker failures beyond ``train.max_failures``.
    """
    requests = start_stop_requests()
    trainer = build_trainer(job, process_group_timeout_s=process_group_timeout_s, stop_requests=requests)
    try:
        signalled = fit_until_signalled(trainer.fit, requests)
    except ray.train.TrainingFailedError as error:
        raise TrainingError(redact_uri(f"training run {job.run_uri} failed: {error}")) from error
    finally:
        ray.kill(requests)
    outcome = checkpoint.read_outcome(job.run_uri)
    run_folder = redact_uri(job.run_uri)
    if outcome is None or outcome.get("invocation") != job.invocation:
        raise TrainingError(f"training run {run_folder} ended without recording its outcome")
    cfg = job.params.train
    if outcome["status"] == STATUS_NONFINITE:
        raise TrainingError(
            f"training stopped at step {outcome['step']}: {outcome['consecutive_skips']} non-finite steps in a "
            f"row (train.max_consecutive_skips={cfg.max_consecutive_skips}); the last good checkpoint (step "
            f"{outcome['last_checkpoint_step']}) is kept in {run_folder}. Lower train.lr or check the data."
        )
    if outcome["status"] == STATUS_STOPPED and signalled.signum is not None:
        raise TrainingStopped(
            f"stopped by {signal.Signals(signalled.signum).name} after step {outcome['step']} of {cfg.max_steps}; "
            f"its checkpoint is in {run_folder}: run the same command again to resume from it",
            signalled.signum,
        )
    early = outcome["status"] == STATUS_STOPPED_EARLY and outcome["last_checkpoint_step"] == outcome["step"]
    if not early and (outcome["status"] != STATUS_COMPLETED or outcome["step"] != cfg.max_steps):
        raise TrainingError(f"training run {run_folder} ended as {outcome['status']!r} at step {outcome['step']}")
    final = checkpoint.dir_name(outcome["step"])
    checkpoint.prune(job.run_uri, protect=frozenset({final}))  # Ray is done: drop what faults left unregistered
    return TrainOutcome(checkpoint.join(job.run_uri, final), outcome)
