"""Which samples make the global batch of each optimiser step, and which of them each rank trains on.

The order is a function of (seed, global step) only, never of the world size, so a run may lose or gain
workers (``train.num_workers: [min, max]``) or resume on another count and still see exactly the sample
sequence of a fixed-size run:

1. Epoch e of the split's N samples (manifest order) is a permutation seeded with ``(seed, e)``
   (``epoch_order``): a fresh order every epoch, mixing samples of all shards.
2. The permutation is padded cyclically to ``steps_per_epoch * Bg`` samples (``Bg``: ``train.batch_size``,
   the global batch) and cut into ``steps_per_epoch = ceil(N / Bg)`` global batches of exactly ``Bg``
   samples (``epoch_plan``): every step sees ``Bg`` images, every sample is used once per epoch and the
   first ``steps_per_epoch * Bg - N`` of the permutation (fewer than ``Bg``) twice.
3. Global step s trains on batch ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``.
4. Rank r of W takes the contiguous share ``[floor(r Bg / W), floor((r + 1) Bg / W))`` of it
   (``rank_share``): ``Bg / W`` samples each when W divides ``Bg``, otherwise shares that differ by one.
   With the loss normalised by the global positives count (``pipeline.training.normalizer``) the summed
   gradient is that of the whole global batch however it is split.

A sample's augmentation draws from a ``torch.Generator`` seeded by ``sample_seed(seed, epoch, key)``, so
a rank's batch is a function of (shards, seed, step, rank, world size) and the global batch of (shards,
seed, step) only: where and when it is made changes nothing (``pipeline.shards.loader``).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def _seed_words(*values: int) -> list[int]:
    return [int(v) % (1 << 64) for v in values]  # SeedSequence takes non-negative words; seeds may be negative


def epoch_order(num_samples: int, *, seed: int, epoch: int) -> np.ndarray:
    """Permutation of ``range(num_samples)`` for one epoch, from ``(seed, epoch)`` only."""
    return np.random.default_rng(_seed_words(seed, epoch)).permutation(num_samples)


def steps_per_epoch(num_samples: int, *, global_batch: int) -> int:
    """Optimiser steps per epoch: ``ceil(N / global_batch)``."""
    _check(num_samples, global_batch)
    return math.ceil(num_samples / global_batch)


def epoch_plan(num_samples: int, *, seed: int, epoch: int, global_batch: int) -> np.ndarray:
    """The global batches of ``epoch``: int64 ``[steps_per_epoch, global_batch]`` sample indices (manifest order);
    row k is the global batch of step ``epoch * steps_per_epoch + k``."""
    steps = steps_per_epoch(num_samples, global_batch=global_batch)
    padded = np.resize(epoch_order(num_samples, seed=seed, epoch=epoch), steps * global_batch)  # cyclic padding
    return padded.reshape(steps, global_batch)


def rank_share(global_batch: int, *, rank: int, world_size: int) -> slice:
    """Positions of rank ``rank``'s samples in a global batch: ``[floor(r Bg / W), floor((r + 1) Bg / W))``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank_share: expected 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if global_batch < world_size:
        raise ValueError(
            f"rank_share: a global batch of {global_batch} cannot give each of {world_size} ranks a sample"
        )
    return slice(rank * global_batch // world_size, (rank + 1) * global_batch // world_size)


def rank_batch(num_samples: int, *, seed: int, step: int, global_batch: int, rank: int, world_size: int) -> np.ndarray:
    """Sample indices (manifest order) rank ``rank`` of ``world_size`` trains on at global step ``step``.

    A slow, readable composition of ``epoch_plan`` and ``rank_share`` (the loader caches the epoch's plan).
    """
    if step < 0:
        raise ValueError(f"rank_batch: expected step >= 0, got {step}")
    epoch, index = divmod(step, steps_per_epoch(num_samples, global_batch=global_batch))
    plan = epoch_plan(num_samples, seed=seed, epoch=epoch, global_batch=global_batch)
    return plan[index][rank_share(global_batch, rank=rank, world_size=world_size)]


def _check(num_samples: int, global_batch: int) -> None:
    if num_samples < 1:
        raise ValueError(f"sample order: expected at least one sample, got {num_samples}")
    if global_batch < 1:
        raise ValueError(f"sample order: expected a global batch >= 1, got {global_batch}")


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """Augmentation seed of one sample in one epoch (63 bits of blake2b; independent of rank and worker)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
