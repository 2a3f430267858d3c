"""Rank 0's progress: interval averages of the loss terms, images/s, ETA, and the per-step MLflow metrics."""

from __future__ import annotations

import logging
import time

from pipeline.training.guard import StepStats

logger = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Accumulates ``StepStats`` between log lines; ``report`` returns the metrics and logs one line.

    Loss averages cover the interval's finite steps only (a skipped step's loss is NaN or inf);
    ``skipped_steps`` and ``bad_samples`` are run totals, carried across resumes by the checkpoint.
    """

    def __init__(self, *, max_steps: int, start_step: int, bad_samples: int = 0) -> None:
        self.max_steps = max_steps
        self.bad_samples = bad_samples
        self._start_step, self._start_time = start_step, time.perf_counter()
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._t0, self._steps, self._finite = now, 0, 0
        self._images = self._positives = self._loss = self._loc = self._conf = 0.0

    def update(self, stats: StepStats) -> None:
        self._steps += 1
        self._images += stats.images
        self.bad_samples += int(stats.bad_samples)
        if stats.finite:
            self._finite += 1
            self._loss += stats.loss
            self._loc += stats.loss_loc
            self._conf += stats.loss_conf
            self._positives += stats.positives

    def report(self, step: int, lr: float, skipped_total: int, epoch: int) -> dict[str, float]:
        """Metrics for ``step`` (MLflow names) and one log line; starts the next interval."""
        now = time.perf_counter()
        elapsed = max(now - self._t0, 1e-9)
        n = max(self._finite, 1)
        nan = float("nan")
        metrics = {
            "train/loss": self._loss / n if self._finite else nan,
            "train/loss_loc": self._loc / n if self._finite else nan,
            "train/loss_conf": self._conf / n if self._finite else nan,
            "train/lr": lr,
            "train/images_per_sec": self._images / elapsed,
            "train/positives_per_image": self._positives / max(self._images, 1.0),
            "train/skipped_steps": float(skipped_total),
            "train/bad_samples": float(self.bad_samples),
        }
        per_step = (now - self._start_time) / max(step - self._start_step, 1)
        logger.info(
            "step %d/%d (epoch %d) loss %.4f (loc %.4f conf %.4f) lr %.3g %.1f img/s skipped %d ETA %s",
            step,
            self.max_steps,
            epoch,
            metrics["train/loss"],
            metrics["train/loss_loc"],
            metrics["train/loss_conf"],
            lr,
            metrics["train/images_per_sec"],
            skipped_total,
            _duration(per_step * (self.max_steps - step)),
        )
        self._reset(now)
        return metrics
