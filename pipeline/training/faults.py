"""Hooks into the training loop for tests; the default ``TrainHooks`` does nothing.

``hooks_from_env()`` returns the default unless ``SSD_TRAIN_TEST_FAULTS`` is set: then ``Faults``, the
TEST-ONLY fault injection that the tests of the distributed run need inside real Ray workers (a worker
killed with SIGKILL mid-run, a kill while a checkpoint is being written, a NaN on one rank). The variable
holds JSON; every entry is optional::

    {"kill": [{"rank": 1, "step": 5, "marker": "/tmp/x/kill-1"}],   # SIGKILL after 5 updates
     "kill_in_checkpoint": {"step": 8, "marker": "/tmp/x/kill-ckpt"},  # rank 0 writing the step-8 checkpoint:
                                                                       # state.pt complete, not yet renamed
     "nan": [{"rank": 1, "steps": [3, 4]}],                          # the 4th and 5th updates' loss is NaN there
     "digest_dir": "/tmp/x/digests",                                 # per-rank records after every step
     "samples_dir": "/tmp/x/samples"}                                # the sample ids each rank trained on

``step`` counts completed optimiser steps: ``kill`` and ``nan`` act on the update that follows ``step``
updates; the records in ``digest_dir`` carry the count after the update. A NaN is injected into the
model's outputs (a one-shot forward hook), so the loss and every gradient of that rank are NaN and the
joint guard skips the step on every rank. A ``marker`` file makes a fault fire once per test: it is
created (O_EXCL) just before the kill, and an existing marker disarms the fault, so the restarted worker
group runs on. The launcher forwards the variable to the workers. Production runs never set it; reading
it costs one ``os.environ`` lookup per worker start.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.training.guard import StepStats

ENV_VAR = "SSD_TRAIN_TEST_FAULTS"


class TrainHooks:
    """Where tests reach into the loop. ``step`` counts completed optimiser steps; this default does nothing."""

    reads_every_step = False  # the loop reads each step's values at once (for after_step) instead of when it logs

    def before_step(self, rank: int, step: int, model: nn.Module) -> None:
        """Before the update that follows ``step`` updates, ahead of its forward pass through ``model``."""

    def on_batch(self, rank: int, world: int, step: int, batch: Any) -> None:
        """The ``TrainBatch`` this rank (of ``world``) trains on in the update that follows ``step`` updates."""

    def after_step(self, rank: int, step: int, model: nn.Module, stats: StepStats) -> None:
        """After the update that made it ``step`` updates (``stats``: that step's values over all ranks)."""

    def before_checkpoint_rename(self, rank: int, step: int) -> Callable[[Path], None] | None:
        """A ``before_rename`` hook for ``checkpoint.write_checkpoint`` of the step-``step`` checkpoint."""
        return None


def hooks_from_env() -> TrainHooks:
    """``Faults`` from ``SSD_TRAIN_TEST_FAULTS`` when it is set, otherwise the no-op ``TrainHooks``."""
    return Faults.from_env() or TrainHooks()


@dataclass(frozen=True)
class Faults(TrainHooks):
    """TEST-ONLY faults (see the module docstring)."""

    kill: tuple[dict, ...] = ()
    kill_in_checkpoint: dict | None = None
    nan: tuple[dict, ...] = ()
    digest_dir: str | None = None
    samples_dir: str | None = None
    reads_every_step = True  # after_step records every step as it happens; a stop lands on the very step

    @classmethod
    def from_env(cls) -> Faults | None:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return None
        spec = json.loads(raw)
        unknown = set(spec) - {"kill", "kill_in_checkpoint", "nan", "digest_dir", "samples_dir"}
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown keys {sorted(unknown)}")
        return cls(
            tuple(spec.get("kill", ())),
            spec.get("kill_in_checkpoint"),
            tuple(spec.get("nan", ())),
            spec.get("digest_dir"),
            spec.get("samples_dir"),
        )

    def before_step(self, rank: int, step: int, model: nn.Module) -> None:
        """SIGKILL this process if a ``kill`` entry names this rank and step (once, by its marker); make the
        next forward of ``model`` return NaN if a ``nan`` entry does."""
        for entry in self.kill:
            if entry["rank"] == rank and entry["step"] == step and _arm(entry.get("marker")):
                os.kill(os.getpid(), signal.SIGKILL)
        if any(entry["rank"] == rank and step in entry["steps"] for entry in self.nan):
            _poison_next_forward(model)

    def before_checkpoint_rename(self, rank: int, step: int) -> Callable[[Path], None] | None:
        """SIGKILL rank 0 once ``state.pt`` of the named step's checkpoint is complete, before the rename."""
        entry = self.kill_in_checkpoint
        if rank != 0 or entry is None or entry["step"] != step:
            return None

        def kill(temp_path: Path) -> None:
            del temp_path
            if _arm(entry.get("marker")):
                os.kill(os.getpid(), signal.SIGKILL)

        return kill

    def on_batch(self, rank: int, world: int, step: int, batch: Any) -> None:
        """Append ``{"step", "world", "rank", "ids"}`` to ``<samples_dir>/<pid>.jsonl``: one file per worker
        process, so the records of each worker-group start stay apart."""
        if not self.samples_dir:
            return
        line = json.dumps({"step": step, "world": world, "rank": rank, "ids": batch.sample_ids.tolist()})
        with open(Path(self.samples_dir) / f"{os.getpid()}.jsonl", "a") as handle:
            handle.write(line + "\n")

    def after_step(self, rank: int, step: int, model: nn.Module, stats: StepStats) -> None:
        """Append ``{"step", "digest", "params_digest", "loss", "finite"}`` to ``<digest_dir>/rank<r>.jsonl``:
        digests of the whole state (parameters and buffers) and of the parameters alone."""
        if not self.digest_dir:
            return
        line = json.dumps(
            {
                "step": step,
                "digest": model_digest(model),
                "loss": stats.loss,
                "finite": stats.finite,
                "params_digest": model_digest(model, buffers=False),
            }
        )
        with open(Path(self.digest_dir) / f"rank{rank}.jsonl", "a") as handle:
            handle.write(line + "\n")


def _poison_next_forward(model: nn.Module) -> None:
    """Multiply every tensor of ``model``'s next output by NaN (a NamedTuple of tensors, e.g. ``SSDOutput``);
    the hook removes itself after that one call."""

    def poison(module: nn.Module, inputs: Any, output: Any) -> Any:
        del module, inputs
        handle.remove()
        return type(output)(*(tensor * float("nan") for tensor in output))

    handle = model.register_forward_hook(poison)


def model_digest(model: nn.Module, *, buffers: bool = True) -> str:
    """sha256 over the names and exact bytes of a model's state (bit-for-bit equality check)."""
    digest = hashlib.sha256()
    items = model.state_dict().items() if buffers else model.named_parameters()
    for name, tensor in items:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _arm(marker: str | None) -> bool:
    """True if the fault should fire now: no marker, or the marker did not exist (and now does)."""
    if marker is None:
        return True
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
