"""``StepLog`` without Ray: what rank 0 logs at which step, and that the other ranks log nothing."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.tracking import NullTracker
from pipeline.training.grad_stats import GradStats
from pipeline.training.optim import build_optimizer
from pipeline.training.progress import Progress
from pipeline.training.step import train_step
from pipeline.training.step_log import StepLog
from ssd_core.model import build_ssd
from tests.pipeline.training.tiny import tiny_batch

CFG = TrainConfig(lr=0.01, lr_reference_batch=2, batch_size=2)


class _RecordingTracker(NullTracker):
    """Keeps what is logged (metric names per step, artifact file names) instead of sending it anywhere."""

    def __init__(self) -> None:
        self.metrics: dict[int, set[str]] = {}
        self.values: dict[tuple[int, str], float] = {}
        self.artifacts: list[str] = []

    def log_metrics(self, metrics, step: int) -> None:
        self.metrics.setdefault(step, set()).update(metrics)
        self.values.update({(step, name): value for name, value in metrics.items()})

    def log_artifact(self, local_path, artifact_path=None) -> None:
        self.artifacts.append(f"{artifact_path}/{Path(local_path).name}")


def _run(rank: int, steps: int = 4) -> tuple[_RecordingTracker, StepLog]:
    torch.manual_seed(0)
    model = build_ssd("ssd_tiny", 4).train()
    optimizer, priors = build_optimizer(model, CFG), model.priors()
    tracker = _RecordingTracker()
    grad_stats = GradStats(model, every=2) if rank == 0 else None
    log = StepLog(
        rank=rank,
        tracker=tracker,
        progress=Progress(max_steps=steps, start_step=0),
        grad_stats=grad_stats,
        log_every=3,
        world=3,
    )
    for step in range(steps):
        observer = log.update_observer(step + 1)
        stats = train_step(model, tiny_batch(model.image_size), priors, optimizer, cfg=CFG, observer=observer).read()
        log.step(step + 1, stats, lr=0.01, epoch=0, skipped_total=0, force=False)
    log.end_epoch(0)
    return tracker, log


def test_rank_zero_logs_step_metrics_and_gradient_statistics_when_due():
    tracker, log = _run(rank=0)
    # Step metrics every 3 steps and at the last (4); gradient statistics every 2 steps.
    assert sorted(tracker.metrics) == [2, 3, 4]
    assert "train/loss" in tracker.metrics[3] and "train/loss" in tracker.metrics[4]
    assert not any(name.startswith("train/") for name in tracker.metrics[2])
    assert tracker.values[(3, "train/world_size")] == tracker.values[(4, "train/world_size")] == 3.0
    for step in (2, 4):
        assert any(name.startswith("grad/") and name.endswith("/update_ratio") for name in tracker.metrics[step])
    assert {row.step for row in log.grad_stats.table_rows} == {2, 4}
    assert tracker.artifacts == ["grad_stats/grad_stats_epoch000.csv", "grad_stats/grad_norm_heatmap_epoch000.png"]
    assert log.bad_samples == 4  # one corrupt sample per batch, summed


def test_other_ranks_log_nothing():
    tracker, log = _run(rank=1)
    assert tracker.metrics == {} and tracker.artifacts == [] and log.update_observer(2) is None
