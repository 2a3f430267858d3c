"""An exponential moving average (EMA) of the model's weights, updated after every optimiser update.

After update ``t`` (counting from 0) every floating-point entry of the state dict (parameters and BatchNorm
running statistics) becomes ``ema = d_t * ema + (1 - d_t) * live`` with the warmed-up rate

    d_t = min(decay, (1 + t) / (10 + t))

so that the first updates do not pin the average to the random initial weights (the TensorFlow
``ExponentialMovingAverage(num_updates=...)`` rule; with ``decay`` 0.999 it reaches ``decay`` after
~9,000 updates and is 0.9 at t = 80). Integer entries (``num_batches_tracked``) are copied. Skipped
(non-finite) steps do not update the average: the weights did not change.

Under DDP the parameters are the same on every rank, the running statistics are not (each rank's forward
moves its own until DDP broadcasts rank 0's at the next one). Every rank keeps an average; rank 0's is the
one a checkpoint stores and validation scores (``pipeline.training.validation`` takes rank 0's buffers).
The in-place updates are deterministic, so a run resumed from a checkpoint continues the average bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

WARMUP_OFFSET = 10  # d_t = (1 + t) / (10 + t) while below decay: 0.1 at the first update, 0.5 at t = 8


class WeightAverage:
    """The EMA of ``model``'s state dict. ``weights`` keep the live tensors' dtypes, devices and layouts."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightAverage: decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0  # averaging updates made so far
        self.weights: dict[str, Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def rate(self, t: int) -> float:
        """``d_t``: the weight of the old average at update ``t`` (module docstring)."""
        return min(self.decay, (1 + t) / (WARMUP_OFFSET + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current state into the average (after an optimiser update)."""
        d = self.rate(self.updates)
        for name, live in model.state_dict().items():
            average = self.weights[name]
            if average.is_floating_point():
                average.mul_(d).add_(live.detach(), alpha=1.0 - d)
            else:
                average.copy_(live)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's average (into the existing tensors: device and layout stay this model's)."""
        if set(state["weights"]) != set(self.weights):
            raise ValueError("WeightAverage: the checkpoint's EMA is of another model (state-dict keys differ)")
        self.updates = int(state["updates"])
        with torch.no_grad():
            for name, value in state["weights"].items():
                self.weights[name].copy_(value)
