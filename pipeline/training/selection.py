"""The best validated step, and early stopping: what ``train.select_metric`` and ``train.patience`` decide.

``BestStep.record`` takes every validation's scores in step order. A validation is an improvement when it
is the first, or when ``select_metric`` is strictly better than the best so far (higher for a mAP, lower
for ``val/loss``); a NaN score never improves on a number. The improving step's weights (the ones that
were scored: EMA when on) are kept, on the CPU, by the ranks that write checkpoints. After ``patience``
validations in a row without an improvement ``should_stop`` turns True.

Every rank records the same broadcast scores (``pipeline.training.validation``), so all ranks decide to
stop at the same step, as they decide to skip a non-finite step (``pipeline.training.guard``). The whole
record, best weights included, is in every checkpoint: the best survives restarts, and a run that stopped
early and is started again stops at once instead of training on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

LOWER_IS_BETTER = frozenset({"val/loss"})


class BestStep:
    """Best and last validation of a run, and the validations since the best."""

    def __init__(self, metric: str, patience: int) -> None:
        self.metric, self.patience = metric, patience
        self.best_step: int | None = None
        self.best_scores: dict[str, float] = {}
        self.best_weights: dict[str, Tensor] | None = None  # CPU copies; None on ranks that keep no weights
        self.last_step: int | None = None
        self.last_scores: dict[str, float] = {}
        self.since_best = 0  # validations since the best one

    def is_better(self, score: float) -> bool:
        """Whether ``score`` of ``metric`` improves strictly on the best so far (the first always does)."""
        if self.best_step is None:
            return True
        best = self.best_scores[self.metric]
        if math.isnan(score):
            return False
        if math.isnan(best):
            return True
        return score < best if self.metric in LOWER_IS_BETTER else score > best

    def record(self, step: int, scores: dict[str, float], weights: Callable[[], dict[str, Tensor]] | None) -> bool:
        """Count the validation at ``step``; returns True when it is the new best. ``weights``: called only
        then, gives the scored weights to keep (None: keep none, e.g. on a rank that writes no checkpoint)."""
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"BestStep.record: steps must increase, got {step} after {self.last_step}")
        improved = self.is_better(float(scores[self.metric]))
        self.last_step, self.last_scores = step, dict(scores)
        if improved:
            self.best_step, self.best_scores, self.since_best = step, dict(scores), 0
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights().items()} if weights else None
        else:
            self.since_best += 1
        return improved

    @property
    def should_stop(self) -> bool:
        """``patience`` validations in a row brought no improvement (never with patience 0)."""
        return self.patience > 0 and self.since_best >= self.patience

    def summary(self) -> dict[str, Any]:
        """JSON values for outcome.json, the model file and eval.json: the metric, best step, both scores."""
        return {
            "select_metric": self.metric,
            "best_step": self.best_step,
            "best": dict(self.best_scores),
            "last_step": self.last_step,
            "last": dict(self.last_scores),
            "validations_since_best": self.since_best,
        }

    def state_dict(self) -> dict[str, Any]:
        return {**self.summary(), "best_weights": self.best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_step, self.best_scores = state["best_step"], dict(state["best"])
        self.last_step, self.last_scores = state["last_step"], dict(state["last"])
        self.since_best = int(state["validations_since_best"])
        self.best_weights = state["best_weights"]
