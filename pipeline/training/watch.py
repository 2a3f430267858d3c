"""What the loop keeps beside the weights it trains: the EMA, validation, the best step and early stopping.

``Watch`` bundles ``ema.WeightAverage`` (``train.ema_decay``), ``validation.Validator``
(``train.val_every_steps``) and ``selection.BestStep`` (``train.select_metric``, ``train.patience``), each
present only when switched on, so the loop calls three methods whatever is configured:

- ``after_update(model, finite)``: fold a successful update into the EMA;
- ``validate_if_due(step, model, tracker)``: every rank scores the weights (EMA when on), rank 0 logs
  ``val/*``; returns True when patience has run out, the same on every rank;
- ``checkpoint_state()``: ``{"ema": ..., "selection": ...}`` for the checkpoint, restored by ``create``.

``final_weights`` picks, from a checkpoint's state, what the model file holds (``train.final_weights``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from pipeline.training import checkpoint
from pipeline.training.ema import WeightAverage
from pipeline.training.job import TrainJob
from pipeline.training.selection import BestStep
from pipeline.training.validation import Validator
from ssd_core.model import SSD

logger = logging.getLogger(__name__)


class Watch:
    def __init__(self, ema: WeightAverage | None, validator: Validator | None, best: BestStep | None, rank: int):
        self.ema, self.validator, self.best, self.rank = ema, validator, best, rank

    @classmethod
    def create(
        cls,
        job: TrainJob,
        rank: int,
        world: int,
        model: SSD,
        device: torch.device,
        resumed: checkpoint.LoadedCheckpoint | None,
    ) -> Watch:
        """The parts ``job`` switches on, restored from ``resumed`` when given. ``model``: on ``device``."""
        cfg = job.params.train
        ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
        validator = Validator(job, rank, world, model, device) if cfg.val_every_steps else None
        best = BestStep(cfg.select_metric, cfg.patience) if cfg.val_every_steps else None
        saved = resumed.state if resumed is not None else {}
        if ema is not None and saved.get("ema") is not None:
            ema.load_state_dict(saved["ema"])
        if best is not None and saved.get("selection") is not None:
            best.load_state_dict(saved["selection"])
        return cls(ema, validator, best, rank)

    @property
    def stopped(self) -> bool:
        """Patience ran out (in a checkpoint of a run that stopped early and is started again)."""
        return self.best is not None and self.best.should_stop

    def after_update(self, model: SSD, finite: bool) -> None:
        if self.ema is not None and finite:
            self.ema.update(model)

    def scored_weights(self, model: SSD) -> dict[str, Tensor]:
        """What validation scores: the EMA when on, else the live weights."""
        return self.ema.weights if self.ema is not None else model.state_dict()

    def validate_if_due(self, step: int, model: SSD, tracker: Any) -> bool:
        """Validate after ``step`` steps when due (every rank); True when the run must stop (patience)."""
        if self.validator is None or self.best is None or not self.validator.due(step):
            return False
        scores = self.validator.run(self.scored_weights(model))
        seconds = scores.pop("val/seconds")
        keep = (lambda: self.scored_weights(model)) if self.rank == 0 else None  # rank 0 writes checkpoints
        improved = self.best.record(step, scores, keep)
        if self.rank == 0:
            extra = {"val/best_step": float(self.best.best_step or 0), "val/seconds": seconds}
            tracker.log_metrics({**scores, **extra}, step)
            logger.info(
                "validation at step %d: %s %.4f%s (best %.4f at step %d) in %.1f s",
                step,
                self.best.metric,
                scores[self.best.metric],
                " (new best)" if improved else "",
                self.best.best_scores[self.best.metric],
                self.best.best_step,
                seconds,
            )
        if self.best.should_stop:
            logger.info(
                "early stop at step %d: %d validations without a better %s (train.patience)",
                step,
                self.best.since_best,
                self.best.metric,
            )
        return self.best.should_stop

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "selection": self.best.state_dict() if self.best is not None else None,
        }


def final_weights(state: dict[str, Any], choice: str) -> tuple[dict[str, Tensor], int]:
    """``(state dict, step it comes from)`` that ``train.final_weights`` = ``choice`` picks from a checkpoint's
    ``state``: ``last`` its model, ``ema`` its average, ``best`` the best validated weights.

    Raises:
        ValueError: the checkpoint holds no such weights (the run had no EMA, or no validation yet).
    """
    if choice == "last":
        return state["model"], int(state["step"])
    if choice == "ema":
        if state.get("ema") is None:
            raise ValueError("train.final_weights=ema: the checkpoint holds no EMA (train.ema_decay was 0)")
        return state["ema"]["weights"], int(state["step"])
    if choice == "best":
        selection = state.get("selection")
        if selection is None or selection.get("best_weights") is None:
            raise ValueError("train.final_weights=best: the checkpoint holds no validated weights")
        return selection["best_weights"], int(selection["best_step"])
    raise ValueError(f"train.final_weights: expected best, last or ema, got {choice!r}")
