"""``StepLog`` without Ray: what rank 0 logs at which step, that the other ranks log nothing, and the gradient
artifacts of a run in a real MLflow store across a checkpoint and resume."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import TrainConfig
from pipeline.tracking import MlflowTracker, NullTracker
from pipeline.training import checkpoint
from pipeline.training.grad_stats import MAX_LAYER_KEY, NORM_KEY, STAT_NAMES, SUMMARY_KEYS, GradStats
from pipeline.training.job import TrainJob
from pipeline.training.optim import build_optimizer
from pipeline.training.progress import Progress
from pipeline.training.state import build_model, build_state, find_resume_checkpoint
from pipeline.training.step import train_step
from pipeline.training.step_log import StepLog
from ssd_core.model import build_ssd
from tests.pipeline.fixtures import make_params
from tests.pipeline.training.tiny import tiny_batch

CFG = TrainConfig(lr=0.01, lr_reference_batch=2, batch_size=2)


class _RecordingTracker(NullTracker):
    """Keeps what is logged (metric names per step, tags, artifact file names) instead of sending it anywhere."""

    def __init__(self) -> None:
        self.metrics: dict[int, set[str]] = {}
        self.values: dict[tuple[int, str], float] = {}
        self.tags: list[dict[str, str]] = []
        self.artifacts: list[str] = []

    def set_tags(self, tags) -> None:
        self.tags.append(dict(tags))

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
    grad_stats = GradStats(model, every=2, max_steps=steps) if rank == 0 else None
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
    assert tracker.metrics[2] == set(SUMMARY_KEYS) and set(SUMMARY_KEYS) < tracker.metrics[4]
    layers = log.grad_stats.layers
    indices = [int(tracker.values[(step, MAX_LAYER_KEY)]) for step in (2, 4)]
    # The tag names the layer whose index is the metric; it is set again only when that layer changes.
    assert tracker.tags == [{MAX_LAYER_KEY: f"{layers[i]} (layer_index {i})"} for i in dict.fromkeys(indices)]
    assert {row.step for row in log.grad_stats.table_rows} == {2, 4}
    # Snapshots at ceil(25/50/75 % of 4 steps) = 1, 2, 3: their last due steps are none, 2 and 2 -> one.
    assert tracker.artifacts == [
        "grad_stats/grad_stats.csv",
        "grad_stats/grad_norm_heatmap.png",
        "grad_stats/snapshots/grad_norm_heatmap_step000002.png",
    ]
    log.close()
    assert len(tracker.artifacts) == 3  # nothing new since the epoch's end: nothing written again
    assert log.bad_samples == 4  # one corrupt sample per batch, summed


def test_other_ranks_log_nothing():
    tracker, log = _run(rank=1)
    assert tracker.metrics == {} and tracker.artifacts == [] and log.update_observer(2) is None


def _train_steps(log: StepLog, model, optimizer, steps: range, epoch_steps: int) -> None:
    """``train_step`` on the tiny batch for ``steps``, gradient statistics where due, ``end_epoch`` after every
    ``epoch_steps``."""
    priors = model.priors()
    for step in steps:
        observer = log.update_observer(step)
        train_step(model, tiny_batch(model.image_size), priors, optimizer, cfg=CFG, observer=observer).read()
        if step % epoch_steps == 0:
            log.end_epoch(step // epoch_steps - 1)


@pytest.mark.slow
def test_gradient_artifacts_are_replaced_in_place_and_their_history_survives_a_resume(tmp_path):
    # 8 steps, statistics every 2, "epochs" of 1 step: the first job checkpoints at step 4 and ends; the
    # resumed job restores the history from the checkpoint and logs steps 5..8 to the same run.
    params = make_params(**{"model.preset": "ssd_tiny", "train.max_steps": 8, "tracking.grad_stats_every": 2})
    params.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = TrainJob(params, str(tmp_path / "shards"), ("a", "b", "c"), str(tmp_path / "run"), str(tmp_path), "0" * 64)
    model = build_model(job, None)
    state = build_state(job, model, 1, None)
    first = StepLog.start(job, 0, 1, model, 0, None)
    _train_steps(first, model, state.optimizer, range(1, 5), epoch_steps=1)
    state.step = 4
    contents, meta = state.checkpoint(job, epoch=3, world=1, bad_samples=0, tracking_run_id=first.tracker.run_id)
    contents.update(first.checkpoint_state())
    checkpoint.write_checkpoint(checkpoint.join(job.run_uri, checkpoint.dir_name(4)), contents, meta)
    first.close()

    resumed = find_resume_checkpoint(job, None, world=1)
    second = StepLog.start(job, 0, 1, model, 4, resumed)
    assert second.grad_stats.table_rows == first.grad_stats.table_rows  # steps 2 and 4
    _train_steps(second, model, state.optimizer, range(5, 9), epoch_steps=1)
    second.close()
    assert second.tracker.close(status=None, timeout_s=30)

    client, run_id = MlflowClient(params.tracking.uri), first.tracker.run_id
    assert second.tracker.run_id == run_id
    files = [a.path for a in client.list_artifacts(run_id, "grad_stats")]
    files += [a.path for a in client.list_artifacts(run_id, "grad_stats/snapshots")]
    assert sorted(files) == [  # logged 5 times each (new rows, the resume), stored once; snapshots at 25/50/75 %
        "grad_stats/grad_norm_heatmap.png",
        "grad_stats/grad_stats.csv",
        "grad_stats/snapshots",
        "grad_stats/snapshots/grad_norm_heatmap_step000002.png",
        "grad_stats/snapshots/grad_norm_heatmap_step000004.png",
        "grad_stats/snapshots/grad_norm_heatmap_step000006.png",
    ]
    table = Path(client.download_artifacts(run_id, "grad_stats/grad_stats.csv", str(tmp_path / "down")))
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = sorted(second.grad_stats.table_rows, key=lambda row: (-row.step, row.layer_index))  # newest first
    assert sorted({row.step for row in expected}) == [2, 4, 6, 8]  # the steps before the resume included
    assert [(int(r["step"]), int(r["layer_index"]), r["layer"]) for r in rows] == [row[:3] for row in expected]
    for r, row in zip(rows, expected, strict=True):
        assert [float(r[name]) for name in STAT_NAMES] == list(row[3:])  # csv writes repr(float): exact
    for step in (2, 4, 6, 8):  # the layers' (clipped) norms add up to the global norm, or to the clip below it
        squares = sum(row.norm**2 for row in expected if row.step == step)
        (norm,) = [m.value for m in client.get_metric_history(run_id, NORM_KEY) if m.step == step]
        assert min(norm, CFG.grad_clip_norm) == pytest.approx(squares**0.5, rel=1e-5), step
    assert MAX_LAYER_KEY in client.get_run(run_id).data.tags


class _StoreThatGoesDown:
    """Wraps a client's ``log_batch``: once ``down()`` is called, the next request blocks until ``gate`` is set
    and is then stored (it was in flight when the job "died"); every later one fails like a dead server."""

    def __init__(self, client) -> None:
        self.log_batch, self.is_down, self.stored_while_down = client.log_batch, False, 0
        self.entered, self.gate = threading.Event(), threading.Event()
        client.log_batch = self

    def down(self) -> None:
        self.is_down = True

    def __call__(self, *args, **kwargs):
        if self.is_down:
            if self.entered.is_set():
                raise ConnectionError("the store is gone")
            self.entered.set()
            assert self.gate.wait(120)
            self.stored_while_down += 1
        return self.log_batch(*args, **kwargs)


def _log(tracker, step: int) -> None:
    tracker.log_metrics({"train/loss": step / 2, "train/lr": step / 100}, step)


@pytest.mark.slow
def test_metrics_unsent_at_a_checkpoint_are_stored_exactly_once_after_the_job_dies_and_resumes(tmp_path):
    params = make_params(**{"model.preset": "ssd_tiny", "train.max_steps": 8, "tracking.grad_stats_every": 0})
    params.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = TrainJob(params, str(tmp_path / "shards"), ("a", "b"), str(tmp_path / "run"), str(tmp_path), "0" * 64)
    model = build_model(job, None)
    first = StepLog.start(job, 0, 1, model, 0, None)
    tracker = first.tracker
    assert isinstance(tracker, MlflowTracker)
    for step in (1, 2, 3):
        _log(tracker, step)
    assert tracker.flush(30)
    store = _StoreThatGoesDown(tracker.client)
    store.down()
    _log(tracker, 4)
    assert store.entered.wait(10)  # step 4 in flight
    _log(tracker, 5)  # step 5 queued
    state = build_state(job, model, 1, None)
    state.step = 5
    contents, meta = state.checkpoint(
        job, epoch=0, world=1, bad_samples=0, tracking_run_id=tracker.run_id, pending_metrics=tracker.pending_metrics()
    )
    assert sorted((k, s) for k, _, _, s in contents["pending_metrics"]) == [
        ("train/loss", 4),
        ("train/loss", 5),
        ("train/lr", 4),
        ("train/lr", 5),
    ]
    checkpoint.write_checkpoint(checkpoint.join(job.run_uri, checkpoint.dir_name(5)), contents, meta)
    _log(tracker, 6)  # logged after the checkpoint: the resumed job recomputes and logs it again
    store.gate.set()  # step 4 is stored after all; 5 and 6 never are
    assert not tracker.close(status=None, timeout_s=1.0)  # the job dies: what is still queued is lost
    assert store.stored_while_down == 1

    resumed = find_resume_checkpoint(job, None, world=1)
    assert resumed is not None and resumed.meta.step == 5
    second = StepLog.start(job, 0, 1, model, 5, resumed)
    assert second.tracker.run_id == tracker.run_id
    for step in (6, 7, 8):
        _log(second.tracker, step)
    assert second.tracker.close(status=None, timeout_s=30)

    client = MlflowClient(params.tracking.uri)
    for key, scale in (("train/loss", 2), ("train/lr", 100)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, key))
        assert history == [(step, step / scale) for step in range(1, 9)], key  # 5 resent; 4 resent, not doubled
