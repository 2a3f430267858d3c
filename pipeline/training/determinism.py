"""Seeds derived from (seed, epoch, step), and deterministic kernels on CPU.

Every random choice of a training step is a function of the run seed and the step's position, never of
how many random numbers were drawn before it. A run that is killed and resumed at step k therefore draws
exactly what an uninterrupted run draws at step k (the data loader does the same for data order and
augmentation, from (seed, epoch, rank, world_size, batch index)).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import torch

_SEED_BITS = 63  # torch.manual_seed takes any int; keep it a non-negative int64


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers, e.g. ``derive_seed(seed, epoch, step)``.

    Hash-based so that neighbouring inputs give unrelated streams (``seed + step`` would make run 0's
    step 1 equal run 1's step 0).
    """
    text = ":".join(str(int(p)) for p in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << _SEED_BITS) - 1)


def seed_step(seed: int, epoch: int, step: int) -> None:
    """Seed torch's and Python's global generators for one training step (same on every rank)."""
    value = derive_seed(seed, epoch, step)
    torch.manual_seed(value)  # also seeds every CUDA device
    random.seed(value)


def configure_determinism(device: torch.device) -> None:
    """Deterministic kernels on CPU; on GPU, fast cuDNN autotuning instead (GPU resume is not bit-exact)."""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict[str, Any]:
    """The global generators' states, as values ``torch.load(weights_only=True)`` accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (CUDA states only where this process has the same GPUs)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
