"""``train_loop_per_worker``: what every DDP rank runs under Ray Train.

Step accounting: ``step`` counts optimiser steps *attempted*. A step that the joint guard skips (a
non-finite loss or gradient on any rank) still counts, and the learning-rate schedule still advances, so
a run always ends after exactly ``train.max_steps`` steps, whatever was skipped and however often it was
restarted. A checkpoint taken after ``step`` steps resumes at batch ``step`` of the data order, which is
a function of (seed, epoch, rank, world size, batch index) only; with the per-step seeds of
``determinism`` and deterministic CPU kernels a resumed run ends with bit-identical weights.

Ray-specific lines: ``ray.train.get_context``, ``ray.train.get_checkpoint``, ``ray.train.torch.get_device``,
``ray.train.torch.prepare_model`` (DDP) and ``ray.train.report`` (``_report``), which every rank calls at the
same steps, rank 0 alone attaching the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import Tensor, nn

from pipeline.config import TrainConfig, params_to_dict
from pipeline.shards.loader import TrainBatch, train_loader
from pipeline.tracking import create_tracker, redact_params, redact_uri
from pipeline.training import checkpoint
from pipeline.training.determinism import configure_determinism, rng_state, seed_step, set_rng_state
from pipeline.training.faults import Faults
from pipeline.training.grad_stats import GradStats
from pipeline.training.guard import SkipGuard, StepStats, reduce_step
from pipeline.training.job import TrainJob
from pipeline.training.optim import build_optimizer, build_scheduler
from pipeline.training.progress import Progress
from ssd_core.augment import AugmentOptions, normalize_images
from ssd_core.backbone import load_vgg16_backbone
from ssd_core.loss import multibox_loss
from ssd_core.matching import assign_targets
from ssd_core.model import SSD, build_ssd

logger = logging.getLogger(__name__)

STATUS_COMPLETED = "completed"
STATUS_NONFINITE = "nonfinite"
_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class _Parts:
    """What one rank trains with, and what its checkpoints hold."""

    job: TrainJob
    rank: int
    world: int
    model: SSD  # the plain module (checkpoints and metrics); ``ddp`` wraps it
    ddp: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    guard: SkipGuard
    tracker: Any
    faults: Faults | None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job: TrainJob = config["job"]
    params, cfg = job.params, job.params.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _setup_logging(rank)
    torch.set_num_threads(cfg.threads_per_worker)
    device = ray.train.torch.get_device()
    configure_determinism(device)
    resumed = _restore(job, ray.train.get_checkpoint(), world)
    p = _build(job, rank, world, resumed)
    step = int(resumed.state["step"]) if resumed else 0
    progress = Progress(max_steps=cfg.max_steps, start_step=step,
                        bad_samples=resumed.state["bad_samples"] if resumed else 0)  # fmt: skip
    grad_stats = GradStats(p.model, every=params.tracking.grad_stats_every) if rank == 0 else None
    priors = p.model.priors().to(device)  # [P, 4] cxcywh
    loader_args = dict(shards=job.shards, rank=rank, world_size=world, batch_size=cfg.batch_size,
                       image_size=p.model.image_size, augment=AugmentOptions(**dataclasses.asdict(params.augment)),
                       seed=params.seed, num_workers=cfg.loader_workers)  # fmt: skip
    steps_per_epoch = len(train_loader(**loader_args, epoch=0))
    saved_step, status = step, STATUS_COMPLETED
    logger.info("rank %d/%d on %s: starting at step %d of %d (%d steps per epoch)",
                rank, world, device, step, cfg.max_steps, steps_per_epoch)  # fmt: skip

    # One loader for every remaining step: its workers run on across epoch boundaries (pipeline.shards.loader).
    first_epoch, first_batch = divmod(step, steps_per_epoch)
    epochs = math.ceil(cfg.max_steps / steps_per_epoch) - first_epoch
    batches = train_loader(**loader_args, epoch=first_epoch, skip_batches=first_batch, epochs=max(epochs, 1),
                           max_batches=cfg.max_steps - step)  # fmt: skip
    for batch in batches:
        epoch = step // steps_per_epoch
        seed_step(params.seed, epoch, step)
        if p.faults:
            p.faults.before_update(rank, step)
        poison = bool(p.faults and p.faults.poison_loss(rank, step))
        stats = _forward_backward(p, batch, priors, device, poison)  # the same on every rank
        due = grad_stats is not None and stats.finite and grad_stats.is_due(step + 1)
        if stats.finite:
            if due:
                grad_stats.before_step()
            p.scaler.step(p.optimizer)
            p.scaler.update()
            if due:
                p.tracker.log_metrics(grad_stats.after_step(step + 1), step + 1)
        stop = p.guard.record(stats.finite)
        p.optimizer.zero_grad(set_to_none=True)
        lr = p.scheduler.get_last_lr()[0]
        p.scheduler.step()  # skipped steps advance the schedule too: every step counts
        step += 1
        if p.faults:
            p.faults.record_step(rank, step, p.model, stats.loss, stats.finite)
        if rank == 0:
            progress.update(stats)
            if step % cfg.log_every_steps == 0 or step == cfg.max_steps or stop:
                p.tracker.log_metrics(progress.report(step, lr, p.guard.skipped_total, epoch), step)
        if stop:
            status = STATUS_NONFINITE
            logger.error("rank %d: %d non-finite steps in a row at step %d; stopping (last good checkpoint "
                         "at step %d)", rank, p.guard.consecutive, step, saved_step)  # fmt: skip
            break
        if step % steps_per_epoch == 0 and grad_stats is not None:
            _log_epoch_artifacts(grad_stats, p.tracker, epoch)
        if step % cfg.checkpoint_every_steps == 0 and step < cfg.max_steps:
            _report(p, step, steps_per_epoch, progress, status)
            saved_step = step

    final_checkpoint = status == STATUS_COMPLETED and saved_step != step
    _report(p, step, steps_per_epoch, progress, status, write=final_checkpoint)
    if rank == 0:
        checkpoint.write_outcome(job.run_uri, {
            "invocation": job.invocation, "status": status, "step": step, "skipped_steps": p.guard.skipped_total,
            "consecutive_skips": p.guard.consecutive, "bad_samples": progress.bad_samples,
            "last_checkpoint_step": step if final_checkpoint else saved_step,
        })  # fmt: skip
    p.tracker.close(status=None)  # the driver ends the MLflow run once the model file is logged


def _build(job: TrainJob, rank: int, world: int, resumed: checkpoint.LoadedCheckpoint | None) -> _Parts:
    """Model (DDP), optimiser, schedule, scaler, guard and tracker; restored from ``resumed`` if given."""
    cfg = job.params.train
    model = _build_model(job, resumed)  # the plain SSD, identical on every rank
    ddp = ray.train.torch.prepare_model(model)  # moved to the device, wrapped in DDP when world > 1
    optimizer = build_optimizer(model, cfg, world)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=cfg.precision == "fp16")
    guard = SkipGuard(cfg.max_consecutive_skips)
    if resumed is not None:
        state = resumed.state
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        guard.load_state_dict(state["guard"])
        set_rng_state(state["rng"])
    run_id = (resumed.meta.tracking_run_id if resumed else None) or job.tracking_run_id
    tracker = create_tracker(job.params.tracking, enabled_here=rank == 0, run_id=run_id, run_name=cfg.run_name,
                             repo_root=job.repo_root, credentials=job.tracking_credentials)  # fmt: skip
    return _Parts(job, rank, world, model, ddp, optimizer, scheduler, scaler, guard, tracker, Faults.from_env())


def _forward_backward(p: _Parts, batch: TrainBatch, priors: Tensor, device: torch.device, poison: bool) -> StepStats:
    """Normalise, match, forward, loss, backward, clip; then the one joint all-reduce (``reduce_step``)."""
    cfg: TrainConfig = p.job.params.train
    images = normalize_images(batch.images.to(device, non_blocking=True))  # [B, 3, S, S] float
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        targets = assign_targets(batch.boxes.to(device), batch.labels.to(device), batch.mask.to(device), priors,
                                 iou_threshold=cfg.iou_threshold, gt_difficult=batch.difficult.to(device))  # fmt: skip
    amp_dtype = _AMP_DTYPES[cfg.precision]
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = p.ddp(images)  # loc [B, P, 4], cls_logits [B, P, C], float32
    terms = multibox_loss(out.loc, out.cls_logits, targets.loc_targets, targets.cls_targets,
                          neg_pos_ratio=cfg.neg_pos_ratio, normalize=cfg.loss_normalize)  # fmt: skip
    total = terms.total * float("nan") if poison else terms.total  # test-only fault (faults.py)
    p.scaler.scale(total).backward()  # DDP all-reduces the gradients here
    p.scaler.unscale_(p.optimizer)  # no-op unless fp16
    params = [w for group in p.optimizer.param_groups for w in group["params"] if w.grad is not None]
    if cfg.grad_clip_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([w.grad for w in params])
    local_finite = torch.isfinite(total.detach()) & torch.isfinite(grad_norm)
    return reduce_step(local_finite=local_finite, loss=total, loss_loc=terms.loc, loss_conf=terms.conf,
                       positives=terms.num_positives, images=batch.images.shape[0],
                       bad_samples=batch.num_bad)  # fmt: skip


def _build_model(job: TrainJob, resumed: checkpoint.LoadedCheckpoint | None) -> SSD:
    params = job.params
    torch.manual_seed(params.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_ssd(params.model.preset, job.num_classes)
    if resumed is not None:
        model.load_state_dict(resumed.state["model"])
    elif params.model.pretrained_backbone:
        load_vgg16_backbone(model, params.model.pretrained_backbone)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _restore(job: TrainJob, ray_checkpoint: ray.train.Checkpoint | None,
             world: int) -> checkpoint.LoadedCheckpoint | None:  # fmt: skip
    """The newest checkpoint that loads: Ray's (after a worker failure, or from its snapshot) or any newer
    one in the run folder that reached storage without Ray registering it. Torn ones are passed over."""
    candidates = dict(checkpoint.list_checkpoints(job.run_uri))  # step -> uri
    if ray_checkpoint is not None:
        name = ray_checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        step = checkpoint.step_of(name)
        if step is not None:
            candidates.setdefault(step, checkpoint.join(job.run_uri, name))
    for _, uri in sorted(candidates.items(), reverse=True):
        try:
            loaded = checkpoint.load_checkpoint(uri)
        except checkpoint.CheckpointError as error:
            logger.warning("not resuming from %s: %s", redact_uri(uri), redact_uri(str(error)))
            continue
        if loaded.state["preset"] != job.params.model.preset or list(loaded.state["classes"]) != list(job.classes):
            raise ValueError(f"{redact_uri(uri)}: checkpoint of preset {loaded.state['preset']} with classes "
                             f"{loaded.state['classes']}, but this run is {job.params.model.preset} with "
                             f"{list(job.classes)}")  # fmt: skip
        logger.info("resuming from %s (step %d)", redact_uri(uri), loaded.meta.step)
        if loaded.meta.world_size != world:
            logger.warning("resuming a run of %d workers on %d: the data split and gradient averages change, so "
                           "the result differs from an uninterrupted run", loaded.meta.world_size, world)  # fmt: skip
        return loaded
    return None


def _report(p: _Parts, step: int, steps_per_epoch: int, progress: Progress, status: str, *,
            write: bool = True) -> None:  # fmt: skip
    """``ray.train.report`` on every rank; rank 0 first writes the checkpoint (``write``) and attaches it."""
    metrics = {"step": step, "status": status, "skipped_steps": p.guard.skipped_total,
               "consecutive_skips": p.guard.consecutive, "bad_samples": progress.bad_samples}  # fmt: skip
    name = checkpoint.dir_name(step) if write else None
    if p.rank != 0 or not write:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    params = redact_params(params_to_dict(p.job.params))  # a storage URL's key stays out of the checkpoint
    state = {
        "step": step, "epoch": step // steps_per_epoch, "model": p.model.state_dict(),
        "optimizer": p.optimizer.state_dict(), "scheduler": p.scheduler.state_dict(),
        "scaler": p.scaler.state_dict() if p.scaler.is_enabled() else {}, "guard": p.guard.state_dict(),
        "bad_samples": progress.bad_samples, "rng": rng_state(), "preset": p.model.preset,
        "classes": list(p.job.classes), "params": params, "tracking_run_id": p.tracker.run_id, "world_size": p.world,
    }  # fmt: skip
    meta = {"step": step, "epoch": state["epoch"], "params": params, "tracking_run_id": p.tracker.run_id,
            "world_size": p.world}  # fmt: skip
    local = Path(tempfile.mkdtemp(prefix="ssd-checkpoint-"))
    try:
        hook = p.faults.checkpoint_hook(p.rank, step) if p.faults else None
        checkpoint.write_checkpoint(local, state, meta, before_rename=hook)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)), checkpoint_dir_name=name)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _log_epoch_artifacts(grad_stats: GradStats, tracker, epoch: int) -> None:
    if not grad_stats.table_rows:
        return
    folder = Path(tempfile.mkdtemp(prefix="ssd-gradstats-"))
    try:
        for path in grad_stats.write_epoch_artifacts(folder, epoch):
            tracker.log_artifact(path, "grad_stats")  # copied to staging at once
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _setup_logging(rank: int) -> None:
    """Rank 0 logs progress at INFO (Ray forwards worker output to the driver); other ranks warnings only."""
    package = logging.getLogger("pipeline")
    package.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
        package.propagate = False
