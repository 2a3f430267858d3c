"""The NaN/inf guard, decided jointly by all ranks, and the one all-reduce per step that carries it.

Every rank runs the same collectives every step whatever its values are: backward (DDP's gradient
all-reduce), then ``reduce_step`` (``sum_over_ranks``: one all-reduce of a small vector holding the
"not finite" flag and the loss terms). The skip decision is read from the reduced vector, so all ranks
skip together and a NaN on one rank can never leave the others waiting in a collective.

Nothing here reads the device back inside a step: ``reduce_step`` returns the reduced vector as a
``StepResult`` (on the training device) and the skip decision stays a 0-d tensor (``DeviceSkips``) that
masks the update. The loop reads results only when it logs or checkpoints, several steps in one transfer
(``read_results``), so an accelerator never waits for the host between steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)


class StepStats(NamedTuple):
    """One step, summed over all ranks (losses averaged)."""

    finite: bool  # every rank's loss and the (all-reduced) gradient norm were finite
    loss: float  # mean over ranks of each rank's total loss
    loss_loc: float
    loss_conf: float
    positives: float  # matched priors in the global batch
    images: float  # images in the global batch
    bad_samples: float  # corrupt samples the loaders skipped since the previous step


class StepResult(NamedTuple):
    """One step's values summed over all ranks, still on the training device (``reduce_step``)."""

    values: Tensor  # float64 [7]: non-finite ranks, loss, loss_loc, loss_conf, positives, images, bad samples
    world: int  # number of ranks

    @property
    def nonfinite(self) -> Tensor:
        """0-d bool: some rank's loss or gradient norm was not finite (the step is skipped on every rank)."""
        return self.values[0] > 0

    def read(self) -> StepStats:
        """The values on the host (one device-to-host transfer)."""
        return read_results([self])[0]


def read_results(results: list[StepResult]) -> list[StepStats]:
    """Several steps' values on the host in one transfer."""
    if not results:
        return []
    rows = torch.stack([r.values for r in results]).tolist()  # [S, 7]
    out = []
    for (nonfinite, total, loc, conf, pos, n_images, bad), result in zip(rows, results, strict=True):
        world = result.world
        out.append(StepStats(nonfinite == 0, total / world, loc / world, conf / world, pos, n_images, bad))
    return out


class DeviceSkips:
    """The consecutive non-finite count of ``SkipGuard`` kept on the device, so that a step decides to skip
    without a host read. Once ``max_consecutive`` steps in a row were skipped, every later step is skipped too
    (the run is halting; the host learns it at its next read, ``SkipGuard.record``), so weights, optimiser
    state and loss scale stay those of the step at which the guard tripped."""

    def __init__(self, max_consecutive: int, consecutive: int, device: torch.device) -> None:
        self.max_consecutive = max_consecutive
        self.count = torch.tensor(consecutive, dtype=torch.int64, device=device)

    def decide(self, nonfinite: Tensor) -> Tensor:
        """0-d bool: skip this step (non-finite, or the guard has tripped). Updates the count."""
        halted = self.count >= self.max_consecutive
        skip = nonfinite | halted
        self.count = torch.where(halted, self.count, torch.where(nonfinite, self.count + 1, 0))
        return skip


SumOverRanks = Callable[[Tensor], tuple[Tensor, int]]
"""``values [K] -> (sum of values over every rank [K], number of ranks)``: the step's one collective."""


def sum_over_ranks(values: Tensor) -> tuple[Tensor, int]:
    """Sum ``values`` over the ranks of the default process group in one all-reduce, in place.

    Returns ``(values, world size)``; on a single process without a process group, ``(values, 1)``
    untouched, so a step runs the same alone (a unit test) as under DDP.
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values, dist.get_world_size()
    return values, 1


def reduce_step(
    *,
    local_finite: Tensor,
    loss: Tensor,
    loss_loc: Tensor,
    loss_conf: Tensor,
    positives: Tensor,
    images: int,
    bad_samples: int,
    sum_ranks: SumOverRanks = sum_over_ranks,
) -> StepResult:
    """Combine this rank's step values (0-d tensors on the training device) over all ranks in one collective;
    the result stays on the device (``StepResult.read``).

    ``sum_ranks`` is that collective (``sum_over_ranks``: one all-reduce, or nothing on one process); every
    rank must call it every step, whatever its values, or the others would wait for it forever.
    """
    values = torch.stack(
        [
            (~local_finite).to(torch.float64),
            loss.detach().to(torch.float64),
            loss_loc.detach().to(torch.float64),
            loss_conf.detach().to(torch.float64),
            positives.detach().to(torch.float64),
            loss.new_full((), float(images), dtype=torch.float64),  # host numbers: no device read
            loss.new_full((), float(bad_samples), dtype=torch.float64),
        ]
    )  # [7]
    summed, world = sum_ranks(values)
    return StepResult(summed, world)


class SkipGuard:
    """Counts skipped (non-finite) steps; after ``max_consecutive`` in a row, ``record`` says stop."""

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(f"SkipGuard: max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped_total = 0
        self.consecutive = 0

    def record(self, finite: bool) -> bool:
        """Count one step; True when the run must stop (``max_consecutive`` non-finite steps in a row)."""
        if finite:
            self.consecutive = 0
            return False
        self.skipped_total += 1
        self.consecutive += 1
        if self.consecutive < self.max_consecutive:
            return False
        logger.error("%d non-finite steps in a row: stopping", self.consecutive)
        return True

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_total = int(state["skipped_total"])
        self.consecutive = int(state["consecutive"])
