"""Which samples go into which batch of which rank in which epoch: the sample order of a training run.

An epoch is cut sample by sample, not shard by shard (``rank_batches``):

1. The split's N samples (manifest order) are permuted by a generator seeded with ``(seed, epoch)``
   (``epoch_order``): a fresh order every epoch, mixing samples of all shards (a stronger shuffle than
   shuffling the shard order, and identical whatever the number of workers).
2. The order is padded cyclically to ``ceil(N / W) * W`` and dealt to the W ranks like cards
   (``rank::W``), so every rank gets exactly ``ceil(N / W)`` samples and every sample is used once per
   global epoch (at most W - 1 are used twice to even out the ranks). Uneven shard sizes cannot make one
   rank run out early and hang DDP.
3. Each rank cuts its samples into ``ceil(ceil(N / W) / batch_size)`` batches (``batches_per_epoch``; the
   last may be smaller, equally on every rank).

A sample's augmentation draws from a ``torch.Generator`` seeded by ``sample_seed(seed, epoch, key)``, so
with this order a batch is a function of (shards, seed, epoch, rank, world_size, batch index) only: where
and when it is made changes nothing (``pipeline.shards.loader``).
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


def batches_per_epoch(num_samples: int, *, world_size: int, batch_size: int) -> int:
    """Batches each rank yields per epoch: ``ceil(ceil(N / W) / batch_size)``."""
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def rank_batches(
    num_samples: int, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int
) -> list[np.ndarray]:
    """Sample indices (manifest order) of each batch of ``rank`` in ``epoch`` (see the module docstring).

    Returns ``batches_per_epoch(...)`` int64 arrays of ``batch_size`` indices each (the last may be shorter).
    """
    if num_samples < 1:
        raise ValueError(f"rank_batches: expected at least one sample, got {num_samples}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank_batches: expected 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"rank_batches: expected batch_size >= 1, got {batch_size}")
    per_rank = math.ceil(num_samples / world_size)
    padded = np.resize(epoch_order(num_samples, seed=seed, epoch=epoch), per_rank * world_size)  # cyclic padding
    mine = padded[rank::world_size]  # [per_rank]
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """Augmentation seed of one sample in one epoch (63 bits of blake2b; independent of rank and worker)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
