"""``train_loop_per_worker``: what every DDP rank runs under Ray Train.

Reads: the steps' values stay on the device until the loop logs (``train.log_every_steps``), checkpoints or
ends, and are then read in one transfer (``_Pending``); the guard counts them at that point.

Step accounting: ``step`` counts optimiser steps *attempted*. A step that the joint guard skips (a
non-finite loss or gradient on any rank) still counts, and the learning-rate schedule still advances, so
a run always ends after exactly ``train.max_steps`` steps, whatever was skipped and however often it was
restarted. A checkpoint taken after ``step`` steps resumes at global batch ``step`` of the data order,
which is a function of (seed, step) only (``pipeline.shards.order``); each rank trains on its share of it.
With the per-step seeds of ``determinism`` and deterministic CPU kernels a run resumed on the same number
of workers ends with bit-identical weights; on another number it continues the same sample sequence with
the same learning rate and loss normaliser (``train.num_workers: [min, max]`` lets Ray Train change it).

Stopping: after every step the ranks agree (``preemption.StopWatch``) whether a signal asked the driver to
stop, and rank 0 then writes the checkpoint of that step before the run ends; a preemption notice from Ray
gets a checkpoint without the stop.

The Ray calls, all in ``train_loop_per_worker`` (and ``preemption``): ``ray.train.get_context``,
``ray.train.get_checkpoint``, ``ray.train.torch.get_device``, ``ray.train.torch.prepare_model`` (DDP) and
``ray.train.report``, which every rank calls at the same steps, rank 0 alone attaching the checkpoint it has
just written (``_Checkpoints.staged``).
"""

from __future__ import annotations

import dataclasses
import logging
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
from pipeline.training.compiled import build_step_functions
from pipeline.training.determinism import configure_determinism, seed_step
from pipeline.training.faults import TrainHooks, hooks_from_env
from pipeline.training.guard import StepResult, read_results
from pipeline.training.job import TrainJob
from pipeline.training.preemption import StopWatch
from pipeline.training.state import TrainState, build_model, build_state, find_resume_checkpoint
from pipeline.training.step import train_step
from pipeline.training.step_log import StepLog
from pipeline.training.watch import Watch
from ssd_core.augment import AugmentOptions

logger = logging.getLogger(__name__)

STATUS_COMPLETED = "completed"
STATUS_NONFINITE = "nonfinite"
STATUS_STOPPED = "stopped"  # a stop was requested (SIGTERM / SIGINT); checkpointed at the step it stopped
STATUS_STOPPED_EARLY = "stopped_early"  # train.patience validations without improvement


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One rank: resume or start, train to ``train.max_steps`` reporting checkpoints, record the outcome."""
    job: TrainJob = config["job"]
    cfg = job.params.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()  # may differ between restarts (elastic)
    _setup_worker(rank, cfg.threads_per_worker)
    device = ray.train.torch.get_device()
    configure_determinism(device)
    resumed = find_resume_checkpoint(job, ray.train.get_checkpoint(), world)
    model = build_model(job, resumed)  # the plain SSD, identical on every rank
    ddp = ray.train.torch.prepare_model(model)  # moved to the device, wrapped in DDP when world > 1
    state = build_state(job, model, world, resumed)  # optimiser, schedule, scaler, guard, step; RNG restored
    log = StepLog.start(job, rank, world, model, state.step, resumed)  # tracker, progress, gradient statistics
    priors = model.priors().to(device)  # [P, 4] cxcywh
    data = _RankData.create(job, rank, world, model.image_size)
    hooks = hooks_from_env()  # test-only faults; does nothing in production
    watch = StopWatch(config.get("stop_requests"))  # the driver's stop request, Ray's preemption notice
    saver, status = _Checkpoints(job, rank, world, data.steps_per_epoch, hooks, state.step), STATUS_COMPLETED
    selector = Watch.create(job, rank, world, model, device, resumed)  # EMA, validation, best step: when on
    status = STATUS_STOPPED_EARLY if selector.stopped else status  # a run that stopped early, started again
    logger.info("rank %d/%d on %s: starting at step %d of %d", rank, world, device, state.step, cfg.max_steps)
    skips, functions, pending = state.device_skips(), build_step_functions(cfg, device), _Pending()
    for batch in data.batches(first_step=state.step) if not selector.stopped else ():
        epoch = state.step // data.steps_per_epoch
        seed_step(job.params.seed, epoch, state.step)
        hooks.before_step(rank, state.step, model)
        hooks.on_batch(rank, world, state.step, batch)
        observer = log.update_observer(state.step + 1)  # gradient statistics, when due
        result = train_step(
            ddp,
            batch,
            priors,
            state.optimizer,
            cfg=cfg,
            scaler=state.scaler,
            observer=observer,
            skips=skips,
            functions=functions,
        )
        pending.add(state.step + 1, result, state.advance(), epoch)  # the schedule advances, step += 1
        if selector.ema is not None:  # the EMA leaves skipped steps out: one host read per step while it is on
            selector.after_update(model, not bool(result.nonfinite))
        decision = watch.decide(state.step)  # the same on every rank
        stopping = decision.stop and state.step < cfg.max_steps
        due = (state.step % cfg.checkpoint_every_steps == 0 or decision.checkpoint) and state.step < cfg.max_steps
        if hooks.reads_every_step or due or stopping or state.step % cfg.log_every_steps == 0:
            if pending.read(state, log, hooks, rank, model, force=stopping):  # the guard tripped: stop
                status = STATUS_NONFINITE
                break
        if state.step % data.steps_per_epoch == 0:
            log.end_epoch(epoch)
        if selector.validate_if_due(state.step, model, log.tracker):  # every rank; True: patience ran out
            status = STATUS_STOPPED_EARLY
            break
        if stopping:
            status = STATUS_STOPPED  # the final report below writes this step's checkpoint
            break
        if due:
            with saver.staged(state, log, status, selector) as staged:
                ray.train.report(staged.metrics, checkpoint=staged.checkpoint, checkpoint_dir_name=staged.dir_name)
    if status != STATUS_NONFINITE and pending.read(state, log, hooks, rank, model):
        status = STATUS_NONFINITE
    # the final report: a checkpoint if the run ended (completed, stopped) and its last step is not saved yet
    with saver.staged(state, log, status, selector, final=True) as staged:
        ray.train.report(staged.metrics, checkpoint=staged.checkpoint, checkpoint_dir_name=staged.dir_name)
    saver.write_outcome(state, log, status)  # rank 0
    log.close()


class _Pending:
    """Steps taken but not yet read back: the loop reads them, several in one transfer, only when it logs,
    checkpoints or ends (every step while test hooks watch), so an accelerator never waits for the host
    between steps. The guard then counts them in order; ``train_step``'s ``DeviceSkips`` has already skipped
    every step after a trip, so stopping at the read leaves the weights of the step that tripped it."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, StepResult, float, int]] = []  # (step after it, result, lr, epoch)

    def add(self, step: int, result: StepResult, lr: float, epoch: int) -> None:
        self.steps.append((step, result, lr, epoch))

    def read(
        self, state: TrainState, log: StepLog, hooks: TrainHooks, rank: int, model: torch.nn.Module, force: bool = False
    ) -> bool:
        """Count, log and hand to the hooks every pending step (the last one's metrics logged when ``force``: the
        run stops there); True if the guard says stop."""
        values = read_results([result for _, result, _, _ in self.steps])
        stop = False
        for (step, _, lr, epoch), stats in zip(self.steps, values, strict=True):
            stop = state.guard.record(stats.finite)
            hooks.after_step(rank, step, model, stats)
            last = force and step == self.steps[-1][0]
            log.step(step, stats, lr=lr, epoch=epoch, skipped_total=state.guard.skipped_total, force=stop or last)
            if stop:
                break
        self.steps.clear()
        return stop


@dataclass(frozen=True)
class _RankData:
    """This rank's share of the global batches of the whole run (``pipeline.shards.loader``): the global batch of
    a step is a function of (seed, step) only, so a run resumed at step k, on any number of workers, reads
    exactly the samples an uninterrupted run would have."""

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
            global_batch=cfg.batch_size,
            image_size=image_size,
            augment=AugmentOptions(**dataclasses.asdict(params.augment)),
            seed=params.seed,
            num_workers=cfg.loader_workers,
            max_boxes=cfg.max_boxes,
        )
        return cls(args, len(train_loader(**args, num_steps=0)), cfg.max_steps)

    def batches(self, first_step: int) -> Iterable[TrainBatch]:
        """Steps ``first_step`` .. ``max_steps - 1`` from one loader, whose workers run on across epochs."""
        return train_loader(**self.loader_args, start_step=first_step, num_steps=self.max_steps - first_step)


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
        self, state: TrainState, log: StepLog, status: str, selector: Watch, *, final: bool = False
    ) -> Iterator[_Staged]:
        """The arguments of the report after ``state.step`` steps, with rank 0's checkpoint of ``state`` in a
        local folder that lives until the report (which uploads it) returns.

        ``final``: the report at the end of the run, with a checkpoint only if the run completed, was asked
        to stop or stopped early, and its last step is not saved yet (a run stopped by the guard keeps its last
        good checkpoint).
        """
        ended = status in (STATUS_COMPLETED, STATUS_STOPPED, STATUS_STOPPED_EARLY)
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
                pending_metrics=log.tracker.pending_metrics(),  # a job killed before they are sent resends them
            )
            contents.update(selector.checkpoint_state())  # EMA and best step (None when off)
            contents.update(log.checkpoint_state())  # the gradient-statistics history behind the table
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
