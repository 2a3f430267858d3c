"""``python -m pipeline train``: distributed training with Ray Train, then the model file.

1. Resolve every location to an absolute path or URL here, on the driver: workers run in other working
   directories and on other machines. Check that every object store among them answers with our
   credentials (``pipeline.storage.check_all``, seconds), before anything else.
2. Validate the shard manifest (sha256 and member counts of every shard) before any worker starts.
3. Take the run folder's lease (``training.lease``: one job at a time per folder; refused at once, or
   ``--wait``), join ``RAY_ADDRESS``'s cluster or start a local Ray; prepare the run folder (resume or start
   fresh).
4. Open (or continue) the MLflow run and record the run's params, world size, device and data.
5. ``TorchTrainer.fit()``; then load the final checkpoint and write ``--model-out`` with
   ``save_model_file`` (loadable without Ray), log it to the run, and log it as an MLflow model (pyfunc,
   ONNX attached) registered as a new version with the alias ``challenger`` (``pipeline.serving.publish``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

import torch
from torch import nn

from pipeline import storage
from pipeline.artifacts.atomic_write import write_bytes_atomic
from pipeline.artifacts.model_file import save_model_file
from pipeline.config import Params, params_to_dict
from pipeline.model_builder import build_model, build_recorded
from pipeline.serving.model_uri import is_model_uri
from pipeline.shards.manifest import ShardError, load_manifest
from pipeline.stage_paths import DVC_FILE, stage_options
from pipeline.tracking import (
    TrackingError,
    create_tracker,
    default_tracking_uri,
    redact_params,
    redact_uri,
    split_credentials,
    tracking_credentials,
)
from pipeline.training import checkpoint
from pipeline.training.init_from import Registry, read_source
from pipeline.training.job import TrainJob, identity_digest
from pipeline.training.lease import LeaseHeld, RunLease
from pipeline.training.optim import check_schedule
from pipeline.training.watch import final_weights

logger = logging.getLogger(__name__)

FINISH_WAIT_S = 120.0  # how long the end of a finished run waits for an MLflow server that is down


def main(args: argparse.Namespace, params: Params) -> int:
    repo_root = Path.cwd().resolve()
    model_out = storage.absolute(args.model_out, repo_root)
    try:
        storage.check_all(
            [
                (storage.absolute(args.shards, repo_root), "--shards"),
                (storage.absolute(params.train.storage_path, repo_root), "train.storage_path"),
                (model_out, "--model-out"),
            ]
        )
        job = build_job(str(args.shards), params, repo_root)
    except (ShardError, ValueError) as error:  # StorageError is a ValueError
        logger.error("train: %s", redact_uri(str(error)))
        return 2
    try:  # one job at a time in a run folder: refuse (or wait) before Ray starts
        lease = RunLease(job.run_uri).acquire(wait_s=args.wait_timeout if args.wait else 0.0)
    except LeaseHeld as error:
        logger.error("train: %s", error)
        return 1
    from pipeline.training.launcher import TrainingError, TrainingStopped, connect_ray  # imports Ray: only here

    lock = _read_lock(repo_root)  # before Ray: a job's working_dir copy may vanish once joined (ray_runtime)
    with lease:
        connected = connect_ray(job.params.train)
        try:
            train(job, params, model_out, lock=lock)
        except TrainingStopped as error:
            if lease.lost is not None:  # the heartbeat stopped this job: another one took its folder
                logger.error("train: %s", lease.lost)
                return 1
            logger.warning("train: %s", redact_uri(str(error)))
            return 128 + error.signum  # the shell's convention for a process ended by that signal
        except (TrainingError, TrackingError, checkpoint.CheckpointError) as error:
            logger.error("train: %s", redact_uri(str(error)))  # messages name the run folder, which may hold a key
            return 1
        except KeyboardInterrupt:
            if lease.lost is None:
                raise
            logger.error("train: %s", lease.lost)
            return 1
        finally:
            if connected:
                import ray

                ray.shutdown()
    return 0


def build_job(shards: str, params: Params, repo_root: Path) -> TrainJob:
    """Absolute locations, the validated manifest and the run folder of this training run.

    The tracking URI in ``job.params`` has no credentials; those of the server (from its URI, else from
    MLflow's credential variables) are in ``job.tracking_credentials``.

    Raises:
        ShardError: the manifest or a shard is missing, truncated or tampered with; no training images, or
            no validation images while ``train.val_every_steps`` asks for validation.
        ValueError: the schedule does not fit ``train.max_steps``, fp16 without a GPU, a missing
            ``model.pretrained_backbone`` file, or a ``model.init_from`` that is no model of this preset.
    """
    shards = storage.absolute(shards, repo_root)
    manifest = load_manifest(shards, verify=True)
    manifest.split_shards("train")  # ShardError when the split is empty
    if params.train.val_every_steps:
        manifest.split_shards("val")  # validation during training needs validation images
    _check_rank_share(params)
    data_digest = hashlib.sha256(storage.read_bytes(storage.join(shards, "manifest.json"))).hexdigest()
    check_schedule(params.train)
    if params.train.precision == "fp16" and not params.train.use_gpu:
        raise ValueError("train.precision: fp16 needs train.use_gpu=true (CPU autocast: use bf16 or fp32)")
    storage_path = storage.absolute(params.train.storage_path, repo_root)
    backbone = params.model.pretrained_backbone
    if backbone:
        backbone = str((repo_root / backbone).resolve())
        if not Path(backbone).is_file():
            raise ValueError(f"model.pretrained_backbone: no file at {backbone}")
    init_from, init_digest = _check_init_from(params, repo_root, manifest.classes)
    tracking_uri = default_tracking_uri(repo_root, params.tracking.uri)
    resolved = dataclasses.replace(
        params,
        model=dataclasses.replace(params.model, pretrained_backbone=backbone, init_from=init_from),
        train=dataclasses.replace(params.train, storage_path=storage_path),
        tracking=dataclasses.replace(params.tracking, uri=split_credentials(tracking_uri)[0]),
    )
    digest = identity_digest(params, data_digest, init_digest=init_digest)
    run_uri = storage.join(storage_path, f"{params.train.run_name}-{digest}")
    return TrainJob(
        params=resolved,
        shards=shards,
        classes=tuple(manifest.classes),
        run_uri=run_uri,
        repo_root=str(repo_root),
        data_digest=data_digest,
        tracking_credentials=tracking_credentials(tracking_uri),
        init_digest=init_digest,
    )


def _check_init_from(params: Params, repo_root: Path, classes: list[str]) -> tuple[str, str]:
    """``(location, sha256)`` of the ``model.init_from`` source, read and checked here, before any worker starts
    (``("", "")`` when not fine-tuning): a path made absolute, a URL, or a registered model's alias resolved to
    its version (``models:/NAME/VERSION``; workers download that version, the identity has its file's sha256).
    Raises ``ValueError`` naming the key."""
    if not params.model.init_from:
        return "", ""
    given = params.model.init_from
    location = given if is_model_uri(given) else storage.absolute(given, repo_root)
    source = read_source(location, Registry(params.tracking, str(repo_root)))  # credentials: this process's
    if source.preset != params.model.preset:
        raise ValueError(
            f"model.init_from: {storage.describe(source.uri)} is a {source.preset} model, but model.preset is "
            f"{params.model.preset}"
        )
    shared = sorted(set(source.classes) & set(classes))
    logger.info(
        "fine-tuning from %s (%s%s): %d of this run's %d classes by name (%s); the others start fresh",
        storage.describe(source.uri),
        source.kind,
        f" {given}" if source.uri != location else "",
        len(shared),
        len(classes),
        ", ".join(shared) or "none",
    )
    return source.uri, source.sha256


def _check_rank_share(params: Params) -> None:
    """Refuse a global batch that leaves a rank one image per step when the model has batch norm (``ssd_tiny``):
    training-mode batch norm cannot normalise a 1x1 map over a single image. A rank's share is at least
    ``floor(batch_size / W)`` (``pipeline.shards.order``), smallest at the most workers."""
    cfg = params.train
    most = cfg.worker_range[1]
    if cfg.batch_size >= 2 * most:
        return
    with torch.device("meta"):  # the layers only
        model = build_model(params.model, ["object"])
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return
    raise ValueError(
        f"train.batch_size: a global batch of {cfg.batch_size} images on up to {most} workers leaves a worker 1 "
        f"image per step, which {params.model.preset}'s batch norm cannot train on; use at least {2 * most}"
    )


def train(
    job: TrainJob,
    params: Params,
    model_out: str | Path,
    *,
    process_group_timeout_s: int | None = None,
    lock: bytes | None = None,
) -> None:
    """Resume or start the run in ``job.run_uri``, train, write the model file (a local path or a URL); Ray
    must be connected.

    ``params`` are the parameters as given (recorded in MLflow and in the model file, URIs redacted);
    ``job.params`` are the same with absolute locations. ``process_group_timeout_s`` bounds
    torch.distributed collectives (default: Ray's 30 minutes; tests use less). ``lock``: ``requirements.lock``
    as ``main`` read it before joining Ray (``_read_lock``; read here when not given).
    """
    from pipeline.training.launcher import (
        DEFAULT_PROCESS_GROUP_TIMEOUT_S,
        TrainingError,
        TrainingStopped,
        prepare_run_folder,
        run_training,
    )

    cfg = job.params.train
    recorded = redact_params(params_to_dict(params))
    if lock is None:  # under `ray job submit` the job's working directory may vanish later (ray_runtime)
        lock = _read_lock(Path(job.repo_root))
    found = prepare_run_folder(job.run_uri, resume=cfg.resume)
    run_folder = redact_uri(job.run_uri)
    if found:
        logger.info("resuming run %s from step %d of %d", run_folder, found[0].step, cfg.max_steps)
    else:
        logger.info("starting run %s (%d steps, %s workers)", run_folder, cfg.max_steps, _workers(cfg.worker_range))
    tracker = create_tracker(
        job.params.tracking,
        enabled_here=True,
        run_id=found[0].tracking_run_id if found else None,
        run_name=cfg.run_name,
        repo_root=job.repo_root,
        credentials=job.tracking_credentials,
    )
    tracker.log_run_metadata(
        recorded, world_size=_workers(cfg.worker_range), device_type="cuda" if cfg.use_gpu else "cpu", shards=job.shards
    )
    tracker.set_tags({"run_folder": run_folder})
    if not found:
        _log_data_report(tracker, Path(job.repo_root))
    tracker.close(status=None)  # rank 0 continues this run during training
    job = dataclasses.replace(job, tracking_run_id=tracker.run_id, invocation=uuid.uuid4().hex)
    try:
        outcome = run_training(job, process_group_timeout_s=process_group_timeout_s or DEFAULT_PROCESS_GROUP_TIMEOUT_S)
        final = checkpoint.load_checkpoint(outcome.checkpoint_uri)
        model = build_recorded(final.state["preset"], job.num_classes, final.state["prior_spec"])
        weights, weights_step = final_weights(final.state, cfg.final_weights)
        model.load_state_dict(weights)
        selection = _selection_record(final.state, cfg.final_weights, weights_step, outcome.metrics["status"])
    except TrainingStopped:
        _finish_run(job, None, "KILLED")  # the same command resumes the run, and this MLflow run with it
        raise
    except (TrainingError, checkpoint.CheckpointError, ValueError):
        _finish_run(job, None, "FAILED")
        raise
    with tempfile.TemporaryDirectory(prefix="ssd-model-") as scratch:
        # MLflow logs a local file: a model going to an object store is written here first, then uploaded
        local = Path(model_out) if not storage.is_url(model_out) else Path(scratch) / Path(str(model_out)).name
        save_model_file(local, model, classes=list(job.classes), params=recorded, selection=selection)
        if storage.is_url(model_out):
            storage.put_file(local, model_out)
        logger.info(
            "train: %d steps (%s; %d skipped, %d corrupt samples); %s weights of step %d written to %s",
            final.meta.step,
            outcome.metrics["status"],
            outcome.metrics.get("skipped_steps", 0),
            outcome.metrics.get("bad_samples", 0),
            cfg.final_weights,
            weights_step,
            model_out,
        )
        _finish_run(job, local, "FINISHED", selection)
        if job.tracking_run_id is not None:
            _publish(job, local, recorded, lock, Path(scratch))


def _read_lock(repo_root: Path) -> bytes | None:
    """``requirements.lock``'s bytes (the MLflow model's pins): the one beside the running ``pipeline`` package
    (the environment this code was installed from), else the repository's; None where neither exists."""
    import pipeline
    from pipeline.serving.publish import LOCK_FILE

    for folder in (Path(pipeline.__file__).resolve().parent.parent, repo_root):
        try:
            return (folder / LOCK_FILE).read_bytes()
        except FileNotFoundError:
            continue
    return None


def _selection_record(state: dict, choice: str, weights_step: int, status: str) -> dict:
    """What the model file and MLflow record about its weights: which ones, of which step, how the run ended,
    and (with validation) the best and the last validation's scores."""
    summary = {k: v for k, v in (state.get("selection") or {}).items() if k != "best_weights"}
    return {"final_weights": choice, "weights_step": weights_step, "status": status, **summary}


def _publish(job: TrainJob, model_file: Path, recorded: dict, lock: bytes | None, scratch: Path) -> None:
    """The model file as an MLflow model of the run, registered with the alias challenger (pipeline.serving).

    ``lock``: ``requirements.lock`` as read before training. A working directory that Ray has deleted
    meanwhile is left for ``scratch`` (torch and MLflow ask for the cwd while they export and save).
    """
    from pipeline.serving.publish import LOCK_FILE, publish_model

    try:
        os.getcwd()
    except FileNotFoundError:
        logger.info("train: the working directory is gone (Ray removed the job's copy); publishing from %s", scratch)
        os.chdir(scratch)
    lock_path = None
    if lock is not None:
        lock_path = scratch / LOCK_FILE
        write_bytes_atomic(lock_path, lock)

    published = publish_model(
        job.params.tracking,
        repo_root=Path(job.repo_root),
        run_id=job.tracking_run_id,
        model_file=model_file,
        params=recorded,
        data_digest=job.data_digest,
        credentials=job.tracking_credentials,
        lock=lock_path,
    )
    where = f"{job.params.tracking.model_name} version {published.version}" if published.version else "unregistered"
    logger.info("train: MLflow model models:/%s (%s)", published.model_id, where)


def _log_data_report(tracker, repo_root: Path) -> None:
    """The ``boxes`` stage's report and histograms (at ``dvc.yaml``'s paths), when that stage has run: MLflow
    artifacts ``data_report/``, and its overall prior recall as ``data/prior_recall`` at step 0."""
    import json

    options = stage_options("boxes", repo_root / DVC_FILE)
    report = repo_root / options.get("--report", "-")
    if not report.is_file():
        return
    tracker.log_artifact(report, "data_report")
    sizes = repo_root / options.get("--plots", "-") / "sizes.png"
    if sizes.is_file():
        tracker.log_artifact(sizes, "data_report")
    recall = json.loads(report.read_text(encoding="utf-8")).get("prior_recall")
    if isinstance(recall, float):
        tracker.log_metrics({"data/prior_recall": recall}, step=0)


def _workers(worker_range: tuple[int, int]) -> int | str:
    """The worker count as a tag: ``4``, or ``"2-4"`` for an elastic run (``train/world_size`` has it by step)."""
    low, high = worker_range
    return low if low == high else f"{low}-{high}"


def _finish_run(job: TrainJob, model_out: Path | None, status: str, selection: dict | None = None) -> None:
    """Log the model file and which weights it holds (``selection``), and end the MLflow run. The run exists and
    training is done: a server that is down for a while (a restart) is waited for, up to ``FINISH_WAIT_S``,
    rather than failing the finished job."""
    if job.tracking_run_id is None:
        return
    deadline = time.monotonic() + FINISH_WAIT_S
    while True:
        try:
            tracker = create_tracker(
                job.params.tracking,
                enabled_here=True,
                run_id=job.tracking_run_id,
                run_name=job.params.train.run_name,
                repo_root=job.repo_root,
                credentials=job.tracking_credentials,
            )
            break
        except TrackingError as error:
            if time.monotonic() > deadline:
                raise
            logger.warning("%s; retrying, to log the model of the finished run", error)
            time.sleep(2.0)
    if selection is not None:
        tracker.set_tags({"final_weights": selection["final_weights"], "weights_step": selection["weights_step"]})
        if selection.get("best_step") is not None:
            # val/best/*, val/last/*: MLflow's UI shows these sections right after val/ (sections sort by name)
            scores = {f"val/best/{k.removeprefix('val/')}": v for k, v in selection["best"].items()}
            scores |= {f"val/last/{k.removeprefix('val/')}": v for k, v in selection["last"].items()}
            scores["val/best/step"] = float(selection["best_step"])
            tracker.log_metrics(scores, selection["last_step"])
    if model_out is not None:
        tracker.log_model_file(model_out, register=False)  # the MLflow model is registered instead
    tracker.close(status=status)
