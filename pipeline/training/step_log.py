"""Per-step bookkeeping of one rank: progress lines, step metrics, gradient statistics and their artifacts.

Only rank 0 logs: on the other ranks the tracker is a ``NullTracker`` and there are no gradient
statistics, so every method may be called on every rank. None of it changes what training computes.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

from pipeline.tracking import create_tracker
from pipeline.training import checkpoint
from pipeline.training.grad_stats import MAX_LAYER_KEY, GradStats
from pipeline.training.guard import StepStats
from pipeline.training.job import TrainJob
from pipeline.training.progress import Progress
from pipeline.training.step import UpdateObserver
from ssd_core.model import SSD


class StepLog:
    """What one rank logs while training.

    Args:
        rank: this rank; rank 0 alone updates the progress and logs.
        tracker: MLflow on rank 0 when tracking is enabled, else a ``NullTracker`` (same methods).
        progress: interval averages and run totals (``bad_samples`` is carried by checkpoints).
        grad_stats: per-layer gradient statistics (rank 0 only), or None; the run tag ``grad_max_update_layer``
            names the layer of the latest metric of that name: ``"<layer> (layer_index <i>)"``.
        log_every: step-metrics interval (``train.log_every_steps``).
        world: the number of ranks, logged with the step metrics as ``train/world_size`` (an elastic run's
            changes with its restarts).
    """

    def __init__(
        self,
        *,
        rank: int,
        tracker: Any,
        progress: Progress,
        grad_stats: GradStats | None,
        log_every: int,
        world: int = 1,
    ) -> None:
        self.rank, self.tracker, self.progress, self.grad_stats = rank, tracker, progress, grad_stats
        self.log_every, self.world = log_every, world
        self._max_update_tag: str | None = None  # the value last set

    @classmethod
    def start(
        cls,
        job: TrainJob,
        rank: int,
        world: int,
        model: SSD,
        start_step: int,
        resumed: checkpoint.LoadedCheckpoint | None,
    ) -> StepLog:
        """Continue the checkpoint's MLflow run (or the driver's), its bad-sample count and its gradient-statistics
        history; queue the metrics that were still unsent when the checkpoint was written (a job ended abruptly
        never sent them) before anything new is logged."""
        cfg = job.params.train
        run_id = (resumed.meta.tracking_run_id if resumed else None) or job.tracking_run_id
        tracker = create_tracker(
            job.params.tracking,
            enabled_here=rank == 0,
            run_id=run_id,
            run_name=cfg.run_name,
            repo_root=job.repo_root,
            credentials=job.tracking_credentials,
        )
        if resumed is not None:  # checkpoints older than this field carry none
            tracker.requeue_metrics(resumed.state.get("pending_metrics", []))
        progress = Progress(
            max_steps=cfg.max_steps, start_step=start_step, bad_samples=resumed.state["bad_samples"] if resumed else 0
        )
        grad_stats = None
        if rank == 0 and job.params.tracking.enabled:  # nothing would see them otherwise
            grad_stats = GradStats(model, every=job.params.tracking.grad_stats_every, max_steps=cfg.max_steps)
            if resumed is not None and "grad_stats" in resumed.state:  # checkpoints older than this field: none
                grad_stats.load_state_dict(resumed.state["grad_stats"])
        return cls(
            rank=rank,
            tracker=tracker,
            progress=progress,
            grad_stats=grad_stats,
            log_every=cfg.log_every_steps,
            world=world,
        )

    @property
    def bad_samples(self) -> int:
        """Corrupt samples the loaders skipped in the whole run (rank 0's count)."""
        return self.progress.bad_samples

    def update_observer(self, step: int) -> UpdateObserver | None:
        """The gradient-statistics observer for the update that makes it ``step`` steps, when they are due."""
        if self.grad_stats is None or not self.grad_stats.is_due(step):
            return None
        return _GradStatsAtStep(self, self.grad_stats, step)

    def checkpoint_state(self) -> dict[str, Any]:
        """Rank 0's gradient-statistics history, for the checkpoint (``start`` restores it); {} elsewhere."""
        return {} if self.grad_stats is None else {"grad_stats": self.grad_stats.state_dict()}

    def step(self, step: int, stats: StepStats, *, lr: float, epoch: int, skipped_total: int, force: bool) -> None:
        """Rank 0: add the step to the progress; log the metrics every ``log_every`` steps, at the last step,
        and when ``force`` (the run stops)."""
        if self.rank != 0:
            return
        self.progress.update(stats)
        if step % self.log_every == 0 or step == self.progress.max_steps or force:
            metrics = self.progress.report(step, lr, skipped_total, epoch)
            self.tracker.log_metrics({**metrics, "train/world_size": float(self.world)}, step)

    def end_epoch(self, epoch: int) -> None:
        """Rank 0: log the run's per-layer gradient table and heatmap (and any snapshot now due) as artifacts,
        when statistics were recorded since they were last written; the same names each time."""
        del epoch  # the artifacts cover the whole run
        self._write_grad_artifacts()

    def close(self) -> None:
        """Log the gradient artifacts not yet written and flush the tracker; the driver ends the MLflow run
        once the model file is logged."""
        self._write_grad_artifacts()
        self.tracker.close(status=None)

    def _write_grad_artifacts(self) -> None:
        if self.grad_stats is None or not self.grad_stats.has_unwritten_rows:
            return
        folder = Path(tempfile.mkdtemp(prefix="ssd-gradstats-"))
        try:
            for path, artifact_folder in self.grad_stats.write_artifacts(folder):
                self.tracker.log_artifact(path, artifact_folder)  # copied to staging at once
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _log_grad_summary(self, step: int) -> None:
        """After a due update: the summary metrics, and the run tag naming the layer that holds the largest
        update ratio (set when it changes)."""
        assert self.grad_stats is not None
        summary = self.grad_stats.after_step(step)
        self.tracker.log_metrics(summary.metrics(), step)
        index = summary.max_update_layer
        tag = f"{self.grad_stats.layers[index]} (layer_index {index})"
        if tag != self._max_update_tag:
            self.tracker.set_tags({MAX_LAYER_KEY: tag})
            self._max_update_tag = tag


class _GradStatsAtStep:
    """``GradStats`` around one update, its summary logged at ``step``."""

    def __init__(self, log: StepLog, grad_stats: GradStats, step: int) -> None:
        self.log, self.grad_stats, self.step = log, grad_stats, step

    def before_update(self, grad_norm: Tensor) -> None:
        self.grad_stats.before_step(grad_norm)

    def after_update(self) -> None:
        self.log._log_grad_summary(self.step)
