"""TEST-ONLY fault injection for the training loop, off unless ``SSD_TRAIN_TEST_FAULTS`` is set.

The tests of issue 5 need real faults inside real Ray workers: a worker killed with SIGKILL mid-run, a
kill while a checkpoint is being written, a NaN on one rank. The variable holds JSON; every entry is
optional::

    {"kill": [{"rank": 1, "step": 5, "marker": "/tmp/x/kill-1"}],   # SIGKILL after 5 updates
     "kill_in_checkpoint": {"step": 8, "marker": "/tmp/x/kill-ckpt"},  # rank 0 writing the step-8 checkpoint:
                                                                       # state.pt complete, not yet renamed
     "nan": [{"rank": 1, "steps": [3, 4]}],                          # the 4th and 5th updates' loss is NaN there
     "digest_dir": "/tmp/x/digests"}                                 # per-rank records after every step

``step`` counts completed optimiser steps: ``kill`` and ``nan`` act on the update that follows ``step``
updates; the records in ``digest_dir`` carry the count after the update. A ``marker`` file makes a fault
fire once per test: it is created (O_EXCL) just before the kill, and an existing marker disarms the
fault, so the restarted worker group runs on. The launcher forwards the variable to the workers.
Production runs never set it; reading it costs one ``os.environ`` lookup per worker start.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ENV_VAR = "SSD_TRAIN_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    kill: tuple[dict, ...] = ()
    kill_in_checkpoint: dict | None = None
    nan: tuple[dict, ...] = ()
    digest_dir: str | None = None

    @classmethod
    def from_env(cls) -> Faults | None:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return None
        spec = json.loads(raw)
        unknown = set(spec) - {"kill", "kill_in_checkpoint", "nan", "digest_dir"}
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown keys {sorted(unknown)}")
        return cls(tuple(spec.get("kill", ())), spec.get("kill_in_checkpoint"), tuple(spec.get("nan", ())),
                   spec.get("digest_dir"))

    def before_update(self, rank: int, step: int) -> None:
        """SIGKILL this process if a ``kill`` entry names this rank and step (once, by its marker)."""
        for entry in self.kill:
            if entry["rank"] == rank and entry["step"] == step and _arm(entry.get("marker")):
                os.kill(os.getpid(), signal.SIGKILL)

    def poison_loss(self, rank: int, step: int) -> bool:
        return any(entry["rank"] == rank and step in entry["steps"] for entry in self.nan)

    def checkpoint_hook(self, rank: int, step: int) -> Callable[[Path], None] | None:
        """A ``before_rename`` hook for ``write_checkpoint`` that SIGKILLs rank 0 at the named step."""
        entry = self.kill_in_checkpoint
        if rank != 0 or entry is None or entry["step"] != step:
            return None

        def kill(temp_path: Path) -> None:
            del temp_path
            if _arm(entry.get("marker")):
                os.kill(os.getpid(), signal.SIGKILL)

        return kill

    def record_step(self, rank: int, step: int, model: nn.Module, loss: float, finite: bool) -> None:
        """Append ``{"step", "digest", "params_digest", "loss", "finite"}`` to ``<digest_dir>/rank<r>.jsonl``:
        digests of the whole state (parameters and buffers) and of the parameters alone."""
        if not self.digest_dir:
            return
        line = json.dumps({"step": step, "digest": model_digest(model), "loss": loss, "finite": finite,
                           "params_digest": model_digest(model, buffers=False)})  # fmt: skip
        with open(Path(self.digest_dir) / f"rank{rank}.jsonl", "a") as handle:
            handle.write(line + "\n")


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
