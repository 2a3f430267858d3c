"""``train_loop_per_worker``: what every DDP rank runs under Ray Train.

Step accounting: ``step`` counts optimiser steps *attempted*. A step that the joint guard skips (a
non-finite loss or gradient on any rank) still counts, and the learning-rate schedule still advances, so
a run always ends after exactly ``train.max_steps`` steps, whatever was skipped and however often it was
restarted. A checkpoint taken after ``step`` steps resumes at batch ``step`` of the data order, which is
a function of (seed, epoch, rank, world size, batch index) only; with the per-step seeds of
``determinism`` and deterministic CPU kernels a resumed run ends with bit-identical weights.

The Ray calls, all in ``train_loop_per_worker``: ``ray.train.get_context``, ``ray.train.get_checkpoint``,
``ray.train.torch.get_device``, ``ray.train.torch.prepare_model`` (DDP) and ``ray.train.report``, which
every rank calls at the same steps, rank 0 alone attaching the checkpoint it has just written
(``_Checkpoints.staged``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import ray.train
import ray.train.torch
import torch

from pipeline.shards.loader import TrainBatch, train_loader
from pipeline.training import checkpoint
from pipeline.training.determinism import configure_determinism, seed_step
from pipeline.training.faults import TrainHooks, hooks_from_env
from pipeline.training.job import TrainJob
from pipeline.training.state import TrainState, build_model, build_state, find_resume_checkpoint
from pipeline.training.step import train_step
from pipeline.training.step_log import StepLog
from pipeline.training.watch import Watch
from ssd_core.augment import AugmentOptions

logger = logging.getLogger(__name__)

STATUS_COMPLETED = "completed"
STATUS_NONFINITE = "nonfinite"
STATUS_STOPPED_EARLY = "stopped_early"  # train.patience validations without improvement


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank: resume or start, train to ``train.max_steps`` reporting checkpoints, record the outcome."""
    job: TrainJob = config["job"]
    cfg = job.params.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    _setup_worker(rank, cfg.threads_per_worker)
    device = ray.train.torch.get_device()
    configure_determinism(device)
    resumed = find_resume_checkpoint(job, ray.train.get_checkpoint(), world)
    model = build_model(job, resumed)  # the plain SSD, identical on every rank
    ddp = ray.train.torch.prepare_model(model)  # moved to the device, wrapped in DDP when world > 1
    state = build_state(job, model, world, resumed)  # optimiser, schedule, scaler, guard, step; RNG restored
    log = StepLog.start(job, rank, model, state.step, resumed)  # tracker, progress, gradient statistics
    priors = model.priors().to(device)  # [P, 4] cxcywh
    data = _RankData.create(job, rank, world, model.image_size)
    hooks = hooks_from_env()  # test-only faults; does nothing in production
    saver, status = _Checkpoints(job, rank, world, data.steps_per_epoch, hooks, state.step), STATUS_COMPLETED
    watch = Watch.create(job, rank, world, model, device, resumed)  # EMA, validation, best step: when switched on
    status = STATUS_STOPPED_EARLY if watch.stopped else status  # a run that stopped early, started again
    logger.info("rank %d/%d on %s: starting at step %d of %d", rank, world, device, state.step, cfg.max_steps)
    for batch in data.batches(first_step=state.step) if not watch.stopped else ():
        epoch = state.step // data.steps_per_epoch
        seed_step(job.params.seed, epoch, state.step)
        hooks.before_step(rank, state.step, model)
        observer = log.update_observer(state.step + 1)  # gradient statistics, when due
        stats = train_step(ddp, batch, priors, state.optimizer, cfg=cfg, scaler=state.scaler, observer=observer)
        lr, stop = state.end_step(stats.finite)  # the guard counts, the schedule advances, step += 1
        watch.after_update(model, stats.finite)  # the EMA, when on
        hooks.after_step(rank, state.step, model, stats)
        log.step(state.step, stats, lr=lr, epoch=epoch, skipped_total=state.guard.skipped_total, force=stop)
        if stop:
            status = STATUS_NONFINITE
            break
        if state.step % data.steps_per_epoch == 0:
            log.end_epoch(epoch)
        if watch.validate_if_due(state.step, model, log.tracker):  # every rank; True: patience ran out
            status = STATUS_STOPPED_EARLY
            break
        if state.step % cfg.checkpoint_every_steps == 0 and state.step < cfg.max_steps:
            with saver.staged(state, log, status, watch) as staged:
                ray.train.report(staged.metrics, checkpoint=staged.checkpoint, checkpoint_dir_name=staged.dir_name)
    with saver.staged(state, log, status, watch, final=True) as staged:  # a checkpoint if completed and not yet saved
        ray.train.report(staged.metrics, checkpoint=staged.checkpoint, checkpoint_dir_name=staged.dir_name)
    saver.write_outcome(state, log, status)  # rank 0
    log.close()


@dataclass(frozen=True)
class _RankData:
    """This rank's batches for the whole run (``pipeline.shards.loader``): the order is a function of (seed, epoch,
    rank, world size, batch index) only, so a run resumed at step k reads exactly the batches it would have."""

    loader_args: dict[str, Any]  # train_loader's arguments that no step changes
    steps_per_epoch: int
    max_steps: int

    @classmethod
    def create(cls, job: TrainJob, rank: int, world: int, image_size: int) -> _RankData:
        params, cfg = job.params, job.params.train
        args = dict(
            shards=job.shards,
            rank=rank,
            world_size=world,
            batch_size=cfg.batch_size,
            image_size=image_size,
            augment=AugmentOptions(**dataclasses.asdict(params.augment)),
            seed=params.seed,
            num_workers=cfg.loader_workers,
        )
        return cls(args, len(train_loader(**args, epoch=0)), cfg.max_steps)

    def batches(self, first_step: int) -> Iterable[TrainBatch]:
        """Batches ``first_step`` .. ``max_steps - 1`` from one loader, whose workers run on across epochs."""
        first_epoch, first_batch = divmod(first_step, self.steps_per_epoch)
        epochs = math.ceil(self.max_steps / self.steps_per_epoch) - first_epoch
        return train_loader(
            **self.loader_args,
            epoch=first_epoch,
            skip_batches=first_batch,
            epochs=max(epochs, 1),
            max_batches=self.max_steps - first_step,
        )


class _Staged(NamedTuple):
    """The arguments of one ``ray.train.report``."""

    metrics: dict[str, Any]
    checkpoint: ray.train.Checkpoint | None  # rank 0's freshly written checkpoint, or None
    dir_name: str | None  # the checkpoint's folder name in the run folder (every rank names it), or None


class _Checkpoints:
    """Every rank reports at the same steps; rank 0 alone writes the checkpoint and the outcome."""

    def __init__(
        self, job: TrainJob, rank: int, world: int, steps_per_epoch: int, hooks: TrainHooks, last_step: int
    ) -> None:
        self.job, self.rank, self.world, self.steps_per_epoch, self.hooks = job, rank, world, steps_per_epoch, hooks
        self.last_step = last_step  # step of the newest checkpoint in the run folder

    @contextmanager
    def staged(
        self, state: TrainState, log: StepLog, status: str, watch: Watch, *, final: bool = False
    ) -> Iterator[_Staged]:
        """The arguments of the report after ``state.step`` steps, with rank 0's checkpoint of ``state`` in a
        local folder that lives until the report (which uploads it) returns.

        ``final``: the report at the end of the run, with a checkpoint only if the run completed (or stopped
        early) and its last step is not saved yet (a run stopped by the guard keeps its last good checkpoint).
        """
        ended = status in (STATUS_COMPLETED, STATUS_STOPPED_EARLY)
        write = not final or (ended and self.last_step != state.step)
        metrics = {
            "step": state.step,
            "status": status,
            "skipped_steps": state.guard.skipped_total,
            "consecutive_skips": state.guard.consecutive,
            "bad_samples": log.bad_samples,
        }
        name = checkpoint.dir_name(state.step) if write else None
        if self.rank != 0 or not write:
            yield _Staged(metrics, None, name)
        else:
            contents, meta = state.checkpoint(
                self.job,
                epoch=state.step // self.steps_per_epoch,
                world=self.world,
                bad_samples=log.bad_samples,
                tracking_run_id=log.tracker.run_id,
            )
            contents.update(watch.checkpoint_state())  # EMA and best step (None when off)
            local = Path(tempfile.mkdtemp(prefix="ssd-checkpoint-"))
            try:
                hook = self.hooks.before_checkpoint_rename(self.rank, state.step)
                checkpoint.write_checkpoint(local, contents, meta, before_rename=hook)
                yield _Staged(metrics, ray.train.Checkpoint.from_directory(str(local)), name)
            finally:
                shutil.rmtree(local, ignore_errors=True)
        if write:
            self.last_step = state.step

    def write_outcome(self, state: TrainState, log: StepLog, status: str) -> None:
        """Rank 0: ``outcome.json`` in the run folder, how this invocation ended (the driver reads it back)."""
        if self.rank != 0:
            return
        outcome = {
            "invocation": self.job.invocation,
            "status": status,
            "step": state.step,
            "skipped_steps": state.guard.skipped_total,
            "consecutive_skips": state.guard.consecutive,
            "bad_samples": log.bad_samples,
            "last_checkpoint_step": self.last_step,
        }
        checkpoint.write_outcome(self.job.run_uri, outcome)


def _setup_worker(rank: int, threads: int) -> None:
    """``threads`` intra-op threads; rank 0 logs progress at INFO (Ray forwards worker output to the driver),
    the other ranks warnings only."""
    torch.set_num_threads(threads)
    package = logging.getLogger("pipeline")
    package.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
        package.propagate = False
