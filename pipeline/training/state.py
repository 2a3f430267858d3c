"""What one rank trains with, built fresh from the job or restored from the newest checkpoint that loads.

Order matters for bit-exact resumes: ``build_model`` seeds torch with ``seed`` and initialises the weights
(the same on every rank); ``build_state`` makes the optimiser over the parameters already on the device
and, when resuming, restores the optimiser, schedule, loss scaler, skip counts and the global RNG states.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import params_to_dict
from pipeline.model_builder import build_model as build_configured
from pipeline.model_builder import prior_spec_for
from pipeline.tracking import redact_params, redact_uri
from pipeline.training import checkpoint
from pipeline.training.determinism import rng_state, set_rng_state
from pipeline.training.guard import DeviceSkips, SkipGuard
from pipeline.training.init_from import Registry, read_source, transfer_table, transfer_weights
from pipeline.training.job import TrainJob
from pipeline.training.optim import build_optimizer, build_scheduler
from ssd_core.backbone import load_vgg16_backbone
from ssd_core.model import SSD

if TYPE_CHECKING:
    import ray.train

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything a checkpoint restores, and the step count.

    ``step`` counts optimiser steps attempted: a step the guard skips still counts and still advances the
    schedule, so a run ends after exactly ``train.max_steps`` steps whatever was skipped.
    """

    model: SSD  # the plain module; DDP, where used, wraps it and shares its parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    guard: SkipGuard
    step: int

    def end_step(self, finite: bool) -> tuple[float, bool]:
        """Count the step just taken: ``(learning rate it used, True if the run must stop)``."""
        stop = self.guard.record(finite)
        return self.advance(), stop

    def advance(self) -> float:
        """Count the step just taken before its values are read (``guard.record`` comes at the next read):
        returns the learning rate it used."""
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()  # skipped steps advance the schedule too: every step counts
        self.step += 1
        return lr

    def device_skips(self) -> DeviceSkips:
        """The guard's consecutive count on the training device, for ``train_step``."""
        device = next(self.model.parameters()).device
        return DeviceSkips(self.guard.max_consecutive, self.guard.consecutive, device)

    def checkpoint(
        self,
        job: TrainJob,
        *,
        epoch: int,
        world: int,
        bad_samples: int,
        tracking_run_id: str | None,
        pending_metrics: list[list[Any]] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(state, meta)`` for ``checkpoint.write_checkpoint``: this state, the RNG states, what the run is
        (preset, classes, params with any storage key redacted), where it logs, and the metrics the tracker
        has not stored yet (``Tracker.pending_metrics``: ``[key, value, timestamp_ms, step]`` each, bounded),
        which a resume from this checkpoint sends again."""
        params = redact_params(params_to_dict(job.params))  # a storage URL's key stays out of the checkpoint
        state = {
            "step": self.step,
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "guard": self.guard.state_dict(),
            "bad_samples": bad_samples,
            "rng": rng_state(),
            "preset": self.model.preset,
            "prior_spec": self.model.prior_spec.to_dict(),  # what the weights were trained with
            "classes": list(job.classes),
            "params": params,
            "tracking_run_id": tracking_run_id,
            "pending_metrics": [list(item) for item in pending_metrics or []],
            "world_size": world,
        }
        meta = {
            "step": self.step,
            "epoch": epoch,
            "params": params,
            "tracking_run_id": tracking_run_id,
            "world_size": world,
        }
        return state, meta


def build_model(job: TrainJob, resumed: checkpoint.LoadedCheckpoint | None) -> SSD:
    """The plain SSD with the same weights on every rank: seeded initialisation (then the VGG16 backbone and
    the ``model.init_from`` source, if given), or the checkpoint's weights when resuming; channels-last if
    configured."""
    params = job.params
    torch.manual_seed(params.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_configured(params.model, job.classes)
    if resumed is not None:
        model.load_state_dict(resumed.state["model"])
    else:
        if params.model.pretrained_backbone:
            load_vgg16_backbone(model, params.model.pretrained_backbone)
        if params.model.init_from:  # fine-tuning: over the backbone, class rows by name
            registry = Registry(params.tracking, job.repo_root, job.tracking_credentials)
            source = read_source(params.model.init_from, registry, expect_sha256=job.init_digest)
            logger.info("%s", transfer_table(transfer_weights(model, source, job.classes), source))
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_state(job: TrainJob, model: SSD, world: int, resumed: checkpoint.LoadedCheckpoint | None) -> TrainState:
    """Optimiser (learning rate scaled to the global batch), schedule, loss scaler and guard for ``model``,
    whose parameters must already be on the training device; restored from ``resumed`` if given, the
    global RNG states included."""
    cfg = job.params.train
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type, enabled=cfg.precision == "fp16")
    guard = SkipGuard(cfg.max_consecutive_skips)
    if resumed is None:
        return TrainState(model, optimizer, scheduler, scaler, guard, step=0)
    saved = resumed.state
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if saved["scaler"]:
        scaler.load_state_dict(saved["scaler"])
    guard.load_state_dict(saved["guard"])
    set_rng_state(saved["rng"])
    return TrainState(model, optimizer, scheduler, scaler, guard, step=int(saved["step"]))


def find_resume_checkpoint(
    job: TrainJob, ray_checkpoint: ray.train.Checkpoint | None, world: int
) -> checkpoint.LoadedCheckpoint | None:
    """The newest checkpoint that loads: Ray's (after a worker failure, or from its snapshot) or any newer
    one in the run folder that reached storage without Ray registering it. Torn ones are passed over.

    Raises:
        ValueError: the checkpoint is of another preset or class list than this job.
    """
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
            raise ValueError(
                f"{redact_uri(uri)}: checkpoint of preset {loaded.state['preset']} with classes "
                f"{loaded.state['classes']}, but this run is {job.params.model.preset} with "
                f"{list(job.classes)}"
            )
        wanted = prior_spec_for(job.params.model).to_dict()
        if loaded.state.get("prior_spec") != wanted:
            raise ValueError(
                f"{redact_uri(uri)}: checkpoint trained with priors {loaded.state.get('prior_spec')}, but this run "
                f"builds {wanted}"
            )
        logger.info("resuming from %s (step %d)", redact_uri(uri), loaded.meta.step)
        if loaded.meta.world_size != world:
            logger.info(
                "resuming a run of %d workers on %d: the same global batches follow, split %d ways (float sums "
                "and per-rank batch norm make the weights differ from a fixed-size run by rounding and noise)",
                loaded.meta.world_size,
                world,
                world,
            )
        return loaded
    return None
